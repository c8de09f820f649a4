"""The fused C decode step against the engine's torch path (its reference), step by step."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model  # noqa: E402  (tests/infer helper)

from tritlm.formats.packed import from_transformer
from tritlm.infer.engine import Engine
from tritlm.kernels.cpu import build, set_min_chunk_blocks
from tritlm.model.transformer import Transformer
from tritlm.quant.config import QuantConfig

pytestmark = pytest.mark.skipif(build.load_library() is None, reason="no C compiler: no compiled kernels")


def _model(max_len: int = 64, **kw) -> Transformer:
    return tiny_model(max_len=max_len, ffn_dim=200, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("kw", [
    {},
    {"n_kv_heads": 2, "qk_norm": True},
    {"n_kv_heads": 1, "mlp": "relu2", "sub_norm": True, "tie_embeddings": True, "residual_scale": 0.7},
    {"quant": QuantConfig(input_norm=True)},
], ids=["base", "gqa-qknorm", "mqa-relu2-subln-tied", "input-norm"])
@pytest.mark.parametrize("threads", [1, 3])
def test_fused_step_matches_torch_path(kw, threads):
    pm = from_transformer(_model(**kw), fp_dtype="fp32")
    fused = Engine(pm, slots=2, threads=threads)
    plain = Engine(pm, slots=2, threads=threads, fused=False)
    assert fused.fused is not None and plain.fused is None
    set_min_chunk_blocks(1)  # split even these tiny matrices across the threads
    try:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 97, (40,), generator=g).tolist()
        for e in (fused, plain):  # slot 1: the slot offset into the KV cache is exercised
            e.prefill(ids[:8], slot=1)
        for t in ids[8:]:
            a, b = fused.forward_seq([t], slot=1)[-1], plain.forward_seq([t], slot=1)[-1]
            # same math in float32, different summation order: int8 rounding of an activation
            # may flip by one step, hence a tolerance rather than bitwise equality
            assert _rel(a, b) < 2e-3
            assert torch.allclose(fused.last_hidden, plain.last_hidden, rtol=0, atol=2e-3 * float(
                plain.last_hidden.abs().max()))
        for i in range(pm.config.n_layers):  # the keys/values it wrote are the torch path's
            assert _rel(fused.k_cache[i][1, :, :40], plain.k_cache[i][1, :, :40]) < 2e-3
            assert _rel(fused.v_cache[i][1, :, :40], plain.v_cache[i][1, :, :40]) < 2e-3
        assert fused.k_cache[0][0].abs().max() == 0  # slot 0 untouched
        assert fused.stats.decode_tokens == 32
    finally:
        set_min_chunk_blocks(256)


def test_fused_long_context_parallel_attention():
    """Past ~128 positions the heads are spread over the thread pool."""
    pm = from_transformer(_model(max_len=300, n_kv_heads=2), fp_dtype="fp32")
    fused, plain = Engine(pm, threads=2), Engine(pm, threads=2, fused=False)
    ids = list(range(1, 97)) * 3
    fused.prefill(ids[:150])
    plain.prefill(ids[:150])
    for t in ids[150:290]:
        a, b = fused.forward_seq([t])[-1], plain.forward_seq([t])[-1]
        assert _rel(a, b) < 2e-3


def test_fused_greedy_tokens_identical():
    pm = from_transformer(_model(n_kv_heads=2), fp_dtype="fp32")
    from tritlm.infer.sampling import SamplingParams

    p = SamplingParams(temperature=0)
    a = list(Engine(pm).generate([3, 1, 4, 1, 5], 40, p))
    b = list(Engine(pm, fused=False).generate([3, 1, 4, 1, 5], 40, p))
    assert a == b


def test_fused_rejects_out_of_range_position():
    pm = from_transformer(_model(), fp_dtype="fp32")
    eng = Engine(pm)
    x, out = torch.zeros(128), torch.empty(1, 128)
    with pytest.raises(ValueError, match="position"):
        eng.fused.step(x, 0, 64, out)
    with pytest.raises(ValueError, match="slot"):
        eng.fused.step(x, 1, 0, out)


def test_engine_without_compiled_kernels_uses_the_torch_path(monkeypatch):
    """TRITLM_KERNEL=numpy (what a machine without a C compiler gets): no fused step, fp32 head,
    same greedy tokens as the compiled engine."""
    from tritlm.infer.sampling import SamplingParams

    pm = from_transformer(_model(n_kv_heads=2), fp_dtype="fp16")
    want = list(Engine(pm).generate([3, 1, 4], 12, SamplingParams(temperature=0)))
    monkeypatch.setenv("TRITLM_KERNEL", "numpy")
    eng = Engine(pm)
    assert eng.fused is None and eng.head._lib is None
    assert list(eng.generate([3, 1, 4], 12, SamplingParams(temperature=0))) == want


class _LowBitLinear:
    """An engine linear run by an int8 / int4 / binary kernel (the engine itself builds ternary ones)."""

    def __init__(self, kernel):
        self.kernel, self.n, self.k = kernel, kernel.n, kernel.k
        self._fast, self._ctx, self._fn, self._threads = True, kernel._ctx, kernel._fwd, kernel.threads or 0

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, out=out)


def _lowbit(kind: str, lin, gen):
    import numpy as np

    from tritlm.kernels.cpu import BinaryLinearKernel, Int4LinearKernel, Int8LinearKernel

    q, s = lin.kernel.packed.unpack().astype(np.int64), lin.kernel.w_scale
    if kind == "int8":  # the same float weights as the ternary matrix, stored as int8 levels
        return Int8LinearKernel(q * 40, s / 40)
    if kind == "int4":  # levels up to +-7, group scales varying along K
        lv = q * 7 - np.sign(q) * (np.arange(q.shape[1]) % 3)
        gs = (s[:, None] / 7 * np.linspace(0.5, 1.5, -(-q.shape[1] // 32))[None, :]).astype(np.float32)
        return Int4LinearKernel(lv, gs, 32)
    w = torch.randint(0, 2, tuple(q.shape), generator=gen).numpy() * 2 - 1
    return BinaryLinearKernel(w, s * 0.3)


@pytest.mark.parametrize("kind", ["int8", "int4", "binary"])
def test_fused_step_runs_every_weight_kind(kind):
    """The fused C step dispatches on the context's kind: int8 / int4 / binary layers give the
    torch path's results (same kernels, called one by one)."""
    from tritlm.infer.fused_decode import FusedDecoder

    pm = from_transformer(_model(n_kv_heads=2), fp_dtype="fp32")
    fused = Engine(pm, threads=2)
    plain = Engine(pm, threads=2, fused=False)
    gen = torch.Generator().manual_seed(2)
    for Lf, Lp in zip(fused.layers, plain.layers):
        for name in ("qkv", "o", "gu", "down"):
            lin = _LowBitLinear(_lowbit(kind, getattr(Lf, name), gen))
            setattr(Lf, name, lin)
            setattr(Lp, name, lin)
    fused.fused = FusedDecoder.create(fused)
    assert fused.fused is not None
    ids = torch.randint(0, 97, (20,), generator=gen).tolist()
    for e in (fused, plain):
        e.prefill(ids[:6])
    for t in ids[6:]:
        a, b = fused.forward_seq([t])[-1], plain.forward_seq([t])[-1]
        assert _rel(a, b) < 2e-3
    assert fused.stats.decode_tokens == 14
