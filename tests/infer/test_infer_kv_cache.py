"""The fp16 and q8 KV caches of the CPU runtime: the C conversions against torch's (and numpy's for
q8), the keys/values the fused step stores against the float32 cache's rounded or quantised, and
what the rounding costs a trained model."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest
import torch
from tiny_models import tiny_model  # noqa: E402  (tests/infer helper)

from tritlm.data.corpus import default_corpus_path, read_corpus
from tritlm.data.tokenizer import CharTokenizer
from tritlm.formats.packed import from_transformer
from tritlm.infer.engine import Engine
from tritlm.kernels.cpu import build
from tritlm.model.config import ModelConfig
from tritlm.model.kv_cache import cache_zeros, dequantize_q8, quantize_q8
from tritlm.model.transformer import Transformer

lib = build.load_library()
pytestmark = pytest.mark.skipif(lib is None, reason="no C compiler: no compiled kernels")


def _floats() -> np.ndarray:
    """Every class a float -> half conversion must get right: random magnitudes over the whole
    half range and beyond, exact ties (round half to even), the subnormal halves, the overflow
    edge (65504 is the largest half, 65520 the first float that rounds to inf), zeros, inf."""
    rng = np.random.default_rng(0)
    mags = np.exp2(rng.uniform(-30, 20, 200_000)) * rng.choice([-1, 1], 200_000)
    h = rng.integers(0, 0x7C00, 20_000, dtype=np.uint16).view(np.float16).astype(np.float32)
    half_ulp = np.float32(2.0) ** (np.floor(np.log2(np.maximum(np.abs(h), 2.0 ** -14))) - 11)
    ties = (h + half_ulp).astype(np.float32)  # exactly between two halves: to the even one
    near = np.concatenate([np.nextafter(ties, np.float32(-np.inf)), np.nextafter(ties, np.float32(np.inf))])
    edge = np.array([0.0, -0.0, 65504.0, 65519.996, 65520.0, -65520.0, 1e30, -np.inf, np.inf, 2.0 ** -24,
                     2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -26, 3 * 2.0 ** -25, 2.0 ** -14, 1e-45],
                    dtype=np.float32)
    return np.concatenate([mags.astype(np.float32), h, ties, -ties, near, edge])


@pytest.mark.parametrize("isa", [1, 0], ids=["f16c", "portable"])
def test_float_to_half_is_torchs_rounding(isa):
    x = np.ascontiguousarray(_floats())
    out = np.empty(x.size, dtype=np.uint16)
    assert lib.tt_f32_to_f16(x.ctypes.data, out.ctypes.data, x.size, isa) == 0
    want = torch.from_numpy(x).half().view(torch.int16).numpy().view(np.uint16)
    bad = np.flatnonzero(out != want)
    assert bad.size == 0, f"{bad.size} differ, first {x[bad[:3]]}: {out[bad[:3]]} vs {want[bad[:3]]}"
    nan = np.array([np.nan, -np.nan], dtype=np.float32)
    got = np.empty(2, dtype=np.uint16)
    lib.tt_f32_to_f16(nan.ctypes.data, got.ctypes.data, 2, isa)
    assert np.isnan(got.view(np.float16)).all()


def test_half_to_float_every_half():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(h.size, dtype=np.float32)
    assert lib.tt_f16_to_f32(h.ctypes.data, out.ctypes.data, h.size) == 0
    want = torch.from_numpy(h.view(np.int16)).view(torch.float16).float().numpy()
    nan = np.isnan(want)
    assert (np.isnan(out) == nan).all()
    assert (out[~nan].view(np.uint32) == want[~nan].view(np.uint32)).all()  # -0.0 included


@pytest.mark.parametrize("kernel", ["auto", "portable"])
def test_fp16_cache_holds_the_float32_keys_rounded(kernel, monkeypatch):
    """Layer 0's keys / values depend on the token embeddings only, so the fp16 engine's must be
    exactly the float32 engine's rounded to half: after a C prefill and after C decode steps (one
    sequence and a batch), the store's rounding is torch's."""
    monkeypatch.setenv("TRITLM_KERNEL", kernel)
    pm = from_transformer(tiny_model(n_kv_heads=2, qk_norm=True), fp_dtype="fp32")
    e16, e32 = Engine(pm, slots=2, kv_dtype="f16"), Engine(pm, slots=2, kv_dtype="f32")
    assert e16.fused is not None and e16.k_cache[0].dtype == torch.float16 and e32.k_cache[0].dtype == torch.float32
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    for e in (e16, e32):
        e.prefill(ids[:20], slot=1)
        e.prefill(ids[:5], slot=0)
        for t in ids[20:25]:
            e.forward_seq([t], slot=1)
        for t in ids[25:]:
            e.decode_batch([t, t], [0, 1])
    for cache16, cache32 in ((e16.k_cache[0], e32.k_cache[0]), (e16.v_cache[0], e32.v_cache[0])):
        assert torch.equal(cache16[1, :, :30], cache32[1, :, :30].half())
        assert torch.equal(cache16[0, :, :10], cache32[0, :, :10].half())
        assert cache16[0, :, 10:].abs().max() == 0 and cache16[1, :, 30:].abs().max() == 0
    # deeper layers see the rounded attention of layer 0: close, not equal
    assert float((e16.k_cache[1].float() - e32.k_cache[1]).abs().max()) < 1e-2 * float(e32.k_cache[1].abs().max())


@pytest.fixture(scope="module")
def trained_packed():
    """A tiny ternary char model trained briefly on Tiny Shakespeare, packed (so that what the fp16
    cache costs is measured on a model whose predictions mean something), and held-out text."""
    text = read_corpus(default_corpus_path())
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text[:200_000]))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_dim=172,
                                max_seq_len=256))
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    try:
        for _ in range(80):
            ix = torch.randint(0, ids.numel() - 129, (16,), generator=g)
            x = torch.stack([ids[i:i + 129] for i in ix])
            _, loss = m(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return from_transformer(m.eval(), fp_dtype="fp32"), tok.encode(text[-2_000:])


def _nll(eng: Engine, ids: list[int]) -> float:
    """Mean negative log-likelihood (float64) of 256-token windows of ``ids``."""
    tot, n = 0.0, 0
    for s in range(0, len(ids) - 256, 256):
        w = ids[s:s + 256]
        lp = torch.log_softmax(eng.logits(w).double(), -1)
        tot -= float(lp[:-1].gather(1, torch.tensor(w[1:]).view(-1, 1)).sum())
        n += len(w) - 1
    return tot / n


def test_fp16_cache_costs_a_trained_model_almost_nothing(trained_packed):
    pm, held = trained_packed
    e16, e32 = Engine(pm, kv_dtype="f16"), Engine(pm, kv_dtype="f32")
    nll16, nll32 = _nll(e16, held), _nll(e32, held)
    assert nll32 < 3.0  # it learned something (uniform over the ~65 characters: 4.17)
    assert abs(nll16 - nll32) < 1e-4 * nll32, (nll16, nll32)
    from tritlm.infer.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    e16.reset(), e32.reset()
    a = list(e16.generate(held[:40], 60, greedy))
    b = list(e32.generate(held[:40], 60, greedy))
    assert sum(x == y for x, y in zip(a, b)) >= 55  # a near-tie may break the other way once


def _q8_rows() -> np.ndarray:
    """Rows that test the q8 rounding: random magnitudes from 1e-30 to 1e30, an all-zero row,
    exact ties (x = (k + 0.5) * scale: half to even), values at +-absmax, one non-zero value."""
    rng = np.random.default_rng(1)
    hd = 96
    rows = (rng.standard_normal((300, hd)) * np.exp2(rng.uniform(-100, 100, (300, 1)))).astype(np.float32)
    ties = np.zeros((4, hd), dtype=np.float32)
    s = np.float32(127.0) / np.float32(127.0)  # absmax 127: scale exactly 1
    ties[:, 0] = 127.0
    ties[:, 1:] = (rng.integers(-126, 126, (4, hd - 1)) + 0.5).astype(np.float32) * s
    one = np.zeros((2, hd), dtype=np.float32)
    one[0, 5], one[1, 7] = -3e-20, 7.5
    return np.concatenate([rows, ties, np.zeros((1, hd), dtype=np.float32), one, -rows[:10]])


def _q8_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The q8 definition in numpy float32: scale = absmax / 127, levels = rint(x / scale)."""
    s = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s[:, None] > 0, np.rint(x / s[:, None]), 0)
    return np.clip(q, -127, 127).astype(np.int8), s


def test_q8_rows_are_numpys_quantisation():
    """torch (quantize_q8) and the C store (portable and AVX2) write the bytes numpy's float32
    arithmetic gives, ties to even included; reading back is within half a step of the row's
    scale of the float64 values."""
    x = np.ascontiguousarray(_q8_rows())
    q, s = _q8_numpy(x)
    want = np.concatenate([q, s.view(np.int8).reshape(-1, 4)], axis=1)
    got = quantize_q8(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, want)
    assert (q[300:304, 1:] % 2 == 0).all()  # the ties went to even levels
    for isa in (0, 1):
        out = np.empty_like(want)
        assert lib.tt_f32_to_q8_rows(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1], isa) == 0
        bad = np.flatnonzero((out != want).any(axis=1))
        assert bad.size == 0, f"isa {isa}: rows {bad[:5]} differ"
    back = dequantize_q8(torch.from_numpy(got)).double().numpy()
    assert (np.abs(back - x.astype(np.float64)) <= 0.5 * s[:, None].astype(np.float64) * (1 + 1e-6)).all()


@pytest.mark.parametrize("kernel", ["auto", "portable"])
def test_q8_cache_holds_the_float32_keys_quantised(kernel, monkeypatch):
    """Layer 0's keys / values in the q8 engine are the float32 engine's quantised by
    quantize_q8, byte for byte, after a C prefill and C decode steps (one sequence and a batch);
    the q8 engine's logits stay close to the float32 engine's."""
    monkeypatch.setenv("TRITLM_KERNEL", kernel)
    pm = from_transformer(tiny_model(n_kv_heads=2, qk_norm=True), fp_dtype="fp32")
    e8, e32 = Engine(pm, slots=2, kv_dtype="q8"), Engine(pm, slots=2, kv_dtype="f32")
    assert e8.fused is not None and e8.k_cache[0].dtype == torch.int8 and e8.k_cache[0].shape[-1] == e8.hd + 4
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    logits = {}
    for name, e in (("q8", e8), ("f32", e32)):
        e.prefill(ids[:20], slot=1)
        e.prefill(ids[:5], slot=0)
        for t in ids[20:25]:
            e.forward_seq([t], slot=1)
        logits[name] = [e.decode_batch([t, t], [0, 1]) for t in ids[25:]]
    for c8, c32 in ((e8.k_cache[0], e32.k_cache[0]), (e8.v_cache[0], e32.v_cache[0])):
        assert torch.equal(c8[1, :, :30], quantize_q8(c32[1, :, :30]))
        assert torch.equal(c8[0, :, :10], quantize_q8(c32[0, :, :10]))
        assert c8[0, :, 10:].abs().max() == 0 and c8[1, :, 30:].abs().max() == 0
    for a, b in zip(logits["q8"], logits["f32"]):
        assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())


def test_q8_fused_step_matches_the_torch_forward():
    """The C step's q8 attention (levels dotted, then the row's scale) against the torch forward
    over a q8 cache (dequantised rows): close logits. Not float32-close: the two paths' keys differ
    in their last bits (summation order), and a value that close to a rounding edge of its row's
    127 steps lands one level apart (~2.5e-3 of the largest logit here; 2e-7 with the fp16 cache)."""
    pm = from_transformer(tiny_model(n_kv_heads=2), fp_dtype="fp32")
    ef, et = Engine(pm, slots=2, kv_dtype="q8"), Engine(pm, slots=2, kv_dtype="q8", fused=False)
    assert ef.fused is not None and et.fused is None
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    for e in (ef, et):
        e.prefill(ids[:30], slot=0)
        e.prefill(ids[:7], slot=1)
    for t in ids[30:]:
        a, b = ef.decode_batch([t, t], [0, 1]), et.decode_batch([t, t], [0, 1])
        assert float((a - b).abs().max()) < 1e-2 * float(b.abs().max())


def test_q8_cache_costs_a_trained_model_little(trained_packed):
    pm, held = trained_packed
    e8, e32 = Engine(pm, kv_dtype="q8"), Engine(pm, kv_dtype="f32")
    nll8, nll32 = _nll(e8, held), _nll(e32, held)
    assert abs(nll8 - nll32) < 1e-3 * nll32, (nll8, nll32)  # 5e-5 here
    from tritlm.infer.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    e8.reset(), e32.reset()
    a = list(e8.generate(held[:40], 60, greedy))
    b = list(e32.generate(held[:40], 60, greedy))
    assert sum(x == y for x, y in zip(a, b)) >= 50


def test_kv_dtype_is_checked_and_auto_resolves():
    pm = from_transformer(tiny_model(), fp_dtype="fp32")
    assert Engine(pm).kv_dtype == "f16" and Engine(pm, backend="dense").kv_dtype == "f32"
    assert Engine(pm, kv_dtype="f32").fused is not None
    with pytest.raises(ValueError, match="kv_dtype"):
        Engine(pm, kv_dtype="bf16")
    # the prefix cache counts an fp16 entry at 2 bytes per element
    from tritlm.infer.prefix_cache import PrefixCache

    eng = Engine(pm)
    assert PrefixCache(eng)._entry_bytes(10) == 2 * 2 * 4 * 10 * 32 * 2
    # and a q8 one at its row of head_dim levels and a 4-byte scale
    assert PrefixCache(Engine(pm, kv_dtype="q8"))._entry_bytes(10) == 2 * 2 * 4 * 10 * (32 + 4)
    from tritlm.errors import ConfigError

    with pytest.raises(ConfigError, match="CPU runtime"):  # refused before anything is placed there
        Engine(pm, kv_dtype="q8", device="meta")
    with pytest.raises(ConfigError, match="divisible by 4"):
        odd = Transformer(ModelConfig(vocab_size=97, dim=24, n_layers=1, n_heads=4, ffn_dim=64))  # head size 6
        Engine(from_transformer(odd.eval(), fp_dtype="fp32"), kv_dtype="q8")


def test_cache_tensors_sit_on_huge_page_boundaries():
    """cache_zeros: zeroed, contiguous, the dtype and shape asked; 2 MiB or more on a Linux CPU
    starts on a 2 MiB boundary (what transparent huge pages need), less is a plain tensor. An
    engine's caches come from it, also when ensure_slots grows them (contents kept)."""
    import sys

    big = cache_zeros((3, 4, 1024, 260), torch.int8)  # 3.0 MiB
    small = cache_zeros((2, 4, 8, 16), torch.float16)
    for t, shape, dt in ((big, (3, 4, 1024, 260), torch.int8), (small, (2, 4, 8, 16), torch.float16)):
        assert t.shape == shape and t.dtype == dt and t.is_contiguous() and int(t.abs().max()) == 0
    if sys.platform.startswith("linux"):
        assert big.data_ptr() % (2 << 20) == 0
    pm = from_transformer(tiny_model(max_len=4096), fp_dtype="fp32")
    e = Engine(pm, slots=2, kv_dtype="f16", cache_len=4096)  # 2 x 4 heads x 4096 x 32 halves = 2 MiB a layer
    ids = list(range(1, 30))
    want = e.prefill(ids, slot=1)
    if sys.platform.startswith("linux"):
        assert all(t.data_ptr() % (2 << 20) == 0 for t in (*e.k_cache, *e.v_cache))
    e.ensure_slots(5)
    assert e.k_cache[0].shape[0] == 5 and e.fused is not None
    e.reset(1)
    assert torch.equal(e.prefill(ids, slot=1), want)
    assert e.k_cache[0][2:].abs().max() == 0


def test_c_entry_points_reject_bad_arguments():
    buf = (ctypes.c_uint16 * 4)()
    assert lib.tt_f32_to_f16(None, ctypes.addressof(buf), 4, 1) == -1
    assert lib.tt_f16_to_f32(ctypes.addressof(buf), None, 4) == -1
    x, q = (ctypes.c_float * 12)(), (ctypes.c_int8 * 32)()
    assert lib.tt_f32_to_q8_rows(None, ctypes.addressof(q), 1, 12, 1) == -1
    assert lib.tt_f32_to_q8_rows(ctypes.addressof(x), ctypes.addressof(q), 1, 6, 1) == -1  # 6 % 4
    assert lib.tt_f32_to_q8_rows(ctypes.addressof(x), ctypes.addressof(q), -1, 12, 1) == -1


@pytest.mark.parametrize("fused", [True, False])
def test_cache_grows_with_the_longest_sequence(fused):
    """A slot's cache starts at cache_len positions and doubles (capped at the context) when a
    sequence needs more, keeping what every slot holds: the logits of an engine that grew 16 ->
    32 -> 64 -> 128 -> 150 are those of one that had all 150 positions from the start, bit for
    bit, through prompts, batched decode and a prefix restored from the prefix cache."""
    from tritlm.infer.prefix_cache import PrefixCache

    pm = from_transformer(tiny_model(max_len=150), fp_dtype="fp32")
    grown, whole = (Engine(pm, slots=3, fused=fused, cache_len=n) for n in (16, 150))
    assert grown.k_cache[0].shape[2] == 16 and whole.k_cache[0].shape[2] == 150
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (10, 40, 5)]
    for e in (grown, whole):
        e.prefill(prompts[0], slot=0)
    assert grown.k_cache[0].shape[2] == 16
    a = [grown.prefill(p, slot=s) for s, p in enumerate(prompts[1:], 1)]
    assert grown.k_cache[0].shape[2] == 64 and (grown.fused is not None) == fused
    b = [whole.prefill(p, slot=s) for s, p in enumerate(prompts[1:], 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for step in range(105):  # slot 1 reaches 145 positions
        toks = torch.randint(0, 97, (3,), generator=g).tolist()
        slots = [0, 1, 2] if step < 60 else [1]
        x, y = grown.decode_batch(toks[:len(slots)], slots), whole.decode_batch(toks[:len(slots)], slots)
        assert torch.equal(x, y), step
    assert grown.k_cache[0].shape[2] == 150 and grown.v_cache[-1].shape[2] == 150  # capped at the context
    assert grown.grow_ahead.used == 2  # 64 -> 128 and 128 -> 150 took tensors allocated ahead
    with pytest.raises(ValueError, match="exceed the context"):
        grown.forward_seq([1] * 6, slot=1)
    with pytest.raises(ValueError, match="cache_len"):
        Engine(pm, fused=fused, cache_len=0)
    # a cached prefix restored into a small cache grows it first
    pc = PrefixCache(whole, max_bytes=1 << 30)
    long_prompt = torch.randint(0, 97, (70,), generator=g).tolist()
    pc.prefill_many([(long_prompt, 0)])
    got = []
    for n in (8, 150):  # each restores the 70-token entry, then prefills 2 tokens
        one = PrefixCache(Engine(pm, slots=1, fused=fused, cache_len=n), max_bytes=1 << 30)
        one.entries = pc.entries.copy()
        got.append(one.prefill_many([(long_prompt + [5, 6], 0)]))
        assert one.hits == 1 and one.engine.k_cache[0].shape[2] == (128 if n == 8 else 150)
    assert all(torch.equal(x, y) for x, y in zip(*got))


def test_cache_growth_out_of_memory_leaves_the_cache_as_it_was(monkeypatch):
    """Growing allocates every new tensor before swapping any in: a MemoryError part-way leaves
    the keys, values, length and fill levels as they were, and the engine goes on (and grows
    once memory is there)."""
    import tritlm.model.kv_cache as kvc

    pm = from_transformer(tiny_model(max_len=150), fp_dtype="fp32")
    e = Engine(pm, slots=2, cache_len=16)
    e.prefill(list(range(1, 12)), slot=0)
    before = [t.clone() for t in e.k_cache + e.v_cache]
    real, calls = kvc.cache_zeros, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) > 3:  # the values' tensors: the keys' are already allocated
            raise MemoryError("out of memory")
        return real(*a, **k)

    monkeypatch.setattr(kvc, "cache_zeros", failing)
    with pytest.raises(MemoryError):
        e.prefill(list(range(1, 40)), slot=1)
    assert len(calls) > 3 and e.cache_len == 16 and e.pos == [11, 0]
    assert all(torch.equal(a, b) for a, b in zip(before, e.k_cache + e.v_cache))
    monkeypatch.undo()
    assert torch.equal(e.forward_seq([5], slot=0), Engine(pm, slots=1).forward_seq(list(range(1, 12)) + [5])[-1:])
    e.prefill(list(range(1, 40)), slot=1)
    assert e.cache_len == 64


def test_the_next_cache_size_is_allocated_ahead_and_dropped_when_shapes_change(monkeypatch):
    """Past 3/4 of its length the cache's next size is allocated on a background thread, and the
    growth swaps those tensors in (their contents: zeros, then the old positions); a growth to
    other shapes (more slots) drops them, and a background allocation that runs out of memory
    leaves the growth to allocate in place."""
    import tritlm.model.kv_cache as kvc

    pm = from_transformer(tiny_model(max_len=150), fp_dtype="fp32")
    ref = Engine(pm, slots=3, cache_len=150)
    e = Engine(pm, slots=2, cache_len=16)
    ids = list(range(1, 14))
    e.prefill(ids, slot=0)  # 13 of 16 positions: past 3/4, the 32-position cache is being allocated
    assert e.grow_ahead._key == (2, 32)
    e.ensure_slots(3)  # other shapes: dropped, grown in place
    assert e.grow_ahead._key is None and e.grow_ahead.used == 0 and e.k_cache[0].shape[:3] == (3, e.KV, 16)
    e.prefill(ids + [7], slot=2)
    assert e.grow_ahead._key == (3, 32)
    made = e.grow_ahead._box
    for slot, prompt in ((0, ids), (2, ids + [7])):
        ref.prefill(prompt, slot=slot)
    for step in range(11):  # slot 2 passes 16 positions at the 3rd, 24 (3/4 of 32) at the 11th
        assert torch.equal(e.decode_batch([5, step], [0, 2]), ref.decode_batch([5, step], [0, 2])), step
        if step == 9:
            assert e.cache_len == 32 and e.grow_ahead.used == 1 and e.k_cache[0] is made["new"][0][0]
            assert e.grow_ahead._key is None
    assert e.grow_ahead._key == (3, 64)  # 25 of 32: the next one is on its way

    def failing(*a, **k):
        raise MemoryError("out of memory")

    e.grow_ahead.discard()
    up_front = Engine(pm, slots=1, cache_len=16)
    up_front.ensure_len(13)  # as serve --kv-len 13 does: the 16 positions hold it, no next size on the way
    assert up_front.cache_len == 16 and up_front.grow_ahead._key is None
    monkeypatch.setattr(kvc, "cache_zeros", failing)
    e.grow_ahead.prepare([e.k_cache, e.v_cache], 3, 64)
    e.grow_ahead._thread.join()
    monkeypatch.undo()
    e.ensure_len(40)
    assert e.cache_len == 64 and e.grow_ahead.used == 1  # allocated in place
    assert torch.equal(e.decode_batch([3, 4], [0, 2]), ref.decode_batch([3, 4], [0, 2]))


def test_a_process_exits_cleanly_while_the_next_cache_is_allocated():
    """The interpreter exiting mid-allocation: the allocation stops and the process exits 0
    (torch's zero_ on a daemon thread aborted it: "terminate called without an active exception")."""
    import subprocess

    code = ("import torch\nfrom tritlm.model.kv_cache import GrowAhead\n"
            "GrowAhead().prepare([[torch.zeros(1, 1, 1, 4)]], 1, 1 << 26)\n"  # 1 GiB being zeroed
            "print('exiting')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "exiting\n" and "terminate" not in r.stderr, r.stderr
