"""Weights moved onto huge pages: the arena's pieces, every kernel kind reading its new copy (and
only it), bad destinations refused, and a packed engine's weights in one arena with the same
logits as an engine whose weights stayed where they were."""

import sys

import numpy as np
import pytest
import torch
from kernel_backends import HAS_C

from tritlm.hugepages import HUGE, Arena, huge_empty
from tritlm.kernels.cpu import BinaryLinearKernel, Int4LinearKernel, Int8LinearKernel, TernaryLinearKernel
from tritlm.kernels.cpu.f16 import F16MatMul

LINUX = sys.platform.startswith("linux")


def test_huge_buffers_and_arena_pieces():
    big = huge_empty(3 * HUGE + 5)
    assert big.dtype == torch.uint8 and big.numel() == 3 * HUGE + 5
    if LINUX:
        assert big.data_ptr() % HUGE == 0
    assert huge_empty(100).numel() == 100
    arena = Arena([100, 5000, 1])
    pieces = [arena.take(n) for n in (100, 5000, 1)]
    assert [p.numel() for p in pieces] == [100, 5000, 1]
    assert all(p.data_ptr() % 64 == 0 for p in pieces)
    assert pieces[1].data_ptr() - pieces[0].data_ptr() == 128  # 100 rounded up to a cache line
    with pytest.raises(ValueError, match="cannot give"):
        arena.take(64)


def _kernels(rng):
    n, k = 37, 300
    t = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    s = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
    return [TernaryLinearKernel(t, s), Int8LinearKernel(rng.integers(-127, 128, size=(n, k)).astype(np.int8), s),
            Int4LinearKernel(rng.integers(-7, 8, size=(n, k)).astype(np.int8), rng.uniform(0.1, 2, (n, 10)), 32),
            BinaryLinearKernel(np.where(t >= 0, 1, -1).astype(np.int8), s)]


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
def test_moved_weights_are_read_from_their_new_place():
    """Same outputs after the move; then scribbling over the old copy changes nothing and over the
    new one changes the outputs: the C context reads the new copy, and only it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 300)).astype(np.float32)
    for kern in _kernels(rng):
        want = kern(x)
        old = kern._data
        dest = torch.zeros(kern.weight_nbytes + 64, dtype=torch.uint8)
        off = -dest.data_ptr() % 64
        kern.move_weights(dest[off:off + kern.weight_nbytes])
        assert kern.weight_ptr == dest.data_ptr() + off
        np.testing.assert_array_equal(kern(x), want)
        old[...] = 0x55
        np.testing.assert_array_equal(kern(x), want)
        dest[off:off + kern.weight_nbytes] = 0x55
        assert not np.array_equal(kern(x), want), type(kern).__name__

    w = torch.randn(19, 40).half()
    mm = F16MatMul(w)
    xt = torch.randn(3, 40)
    want = mm(xt)
    mm.move_weights(torch.empty(mm.weight_nbytes, dtype=torch.uint8))
    assert torch.equal(mm(xt), want)
    w.zero_()  # the caller's tensor is no longer read (it was the matmul's own copy before the move)
    assert torch.equal(mm(xt), want)


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
def test_move_weights_refuses_a_wrong_destination():
    kern = _kernels(np.random.default_rng(1))[0]
    buf = torch.zeros(kern.weight_nbytes + 128, dtype=torch.uint8)
    off = -buf.data_ptr() % 64
    with pytest.raises(ValueError, match="64-byte aligned"):
        kern.move_weights(buf[off:off + kern.weight_nbytes - 1])
    with pytest.raises(ValueError, match="64-byte aligned"):
        kern.move_weights(buf[off + 1:off + 1 + kern.weight_nbytes])
    mm = F16MatMul(torch.randn(4, 8).half())
    with pytest.raises(ValueError, match="bytes"):
        mm.move_weights(torch.empty(mm.weight_nbytes + 2, dtype=torch.uint8))


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
@pytest.mark.parametrize("tied", [False, True])
def test_engine_weights_share_one_arena_and_give_the_same_logits(monkeypatch, tied):
    """4 layers of dim 512 (~2.6 MB of ternary weights) and an fp16 head: one 2 MiB-aligned arena
    holds every Linear's weights and the head, which the packed model's own tensor (the
    embedding, when tied) now reads too (one copy, same values); the logits are bit-identical to
    an engine whose weights were not moved."""
    from tritlm.formats.packed import from_transformer
    from tritlm.infer import engine as engine_mod
    from tritlm.model.config import ModelConfig
    from tritlm.model.transformer import Transformer
    from tritlm.nn.placement import streamed_weights

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=512, n_layers=4, n_heads=8, ffn_dim=1024, max_seq_len=64,
                      tie_embeddings=tied)
    pm = from_transformer(Transformer(cfg).eval(), fp_dtype="fp16")
    name = "embed_tokens.weight" if tied else "lm_head.weight"
    before = pm.fp[name].clone()
    ids = list(range(1, 20))
    monkeypatch.setattr(engine_mod, "place_packed_weights", lambda *a, **k: 0)
    ref = engine_mod.Engine(pm, head="f16")
    unmoved = [h.weight_ptr for m in ref.linear_modules() for h in streamed_weights(m.runner)]
    want = [ref.prefill(ids), ref.decode_batch([5])]
    monkeypatch.undo()

    e = engine_mod.Engine(pm, head="f16")
    held = [h for m in e.linear_modules() for h in streamed_weights(m.runner)] + streamed_weights(e.head)
    ptrs = [h.weight_ptr for h in held]
    assert ptrs == sorted(ptrs) and ptrs[-1] + held[-1].weight_nbytes - ptrs[0] < 4 * HUGE
    assert not set(ptrs) & set(unmoved)
    if LINUX:
        assert ptrs[0] % HUGE == 0
    assert pm.fp[name].data_ptr() == ptrs[-1] and torch.equal(pm.fp[name], before)
    if tied:
        assert e.model.embed_tokens.w.data_ptr() == ptrs[-1]
    got = [e.prefill(ids), e.decode_batch([5])]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
