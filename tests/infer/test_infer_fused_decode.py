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
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


# fused vs torch path: the same float32 math in another summation order, so an int8 rounding of an
# activation may flip by one step; with the fp16 cache both paths round the keys / values they
# wrote, and a flip upstream can move a stored half by a few of its ulps (2^-10 relative)
TOL = {"f32": 2e-3, "f16": 3e-3}


@pytest.mark.parametrize("threads", [1, 3])
def test_fp16_cache_rows_are_the_float32_rows_rounded(threads):
    """Layer 0's keys / values come before any attention, so an fp16-cache engine and a float32 one
    compute the same floats there: the halves the C step wrote (streamed past the caches when a
    row is 32-byte aligned) must be those floats rounded to nearest, bit for bit, for the prompt's
    rows and every decoded token's, and nothing past them."""
    pm = from_transformer(_model(n_kv_heads=2), fp_dtype="fp32")
    e16 = Engine(pm, slots=2, threads=threads, kv_dtype="f16")
    e32 = Engine(pm, slots=2, threads=threads, kv_dtype="f32")
    assert e16.fused is not None and e32.fused is not None
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    for e in (e16, e32):
        e.prefill(ids[:9], slot=1)
        e.prefill(ids[:5], slot=0)
        for t in ids[9:20]:  # one sequence a step, then two
            e.forward_seq([t], slot=1)
        for t in ids[20:]:
            e.decode_batch([t, t], [1, 0])
    for c16, c32 in ((e16.k_cache[0], e32.k_cache[0]), (e16.v_cache[0], e32.v_cache[0])):
        for slot, n in ((1, 30), (0, 15)):
            assert torch.equal(c16[slot, :, :n].view(torch.int16), c32[slot, :, :n].half().view(torch.int16))
            assert c16[slot, :, n:].abs().max() == 0


@pytest.mark.parametrize("kw", [
    {},
    {"n_kv_heads": 2, "qk_norm": True},
    {"n_kv_heads": 1, "mlp": "relu2", "sub_norm": True, "tie_embeddings": True, "residual_scale": 0.7},
    {"quant": QuantConfig(input_norm=True)},
], ids=["base", "gqa-qknorm", "mqa-relu2-subln-tied", "input-norm"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_fused_step_matches_torch_path(kw, threads, kv):
    pm = from_transformer(_model(**kw), fp_dtype="fp32")
    fused = Engine(pm, slots=2, threads=threads, kv_dtype=kv)
    plain = Engine(pm, slots=2, threads=threads, fused=False, kv_dtype=kv)
    tol = TOL[kv]
    assert fused.fused is not None and plain.fused is None
    set_min_chunk_blocks(1)  # split even these tiny matrices across the threads
    try:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 97, (40,), generator=g).tolist()
        for e in (fused, plain):  # slot 1: the slot offset into the KV cache is exercised
            e.prefill(ids[:8], slot=1)
        for t in ids[8:]:
            a, b = fused.forward_seq([t], slot=1)[-1], plain.forward_seq([t], slot=1)[-1]
            assert _rel(a, b) < tol  # a tolerance rather than bitwise equality: see TOL
            assert torch.allclose(fused.last_hidden, plain.last_hidden, rtol=0, atol=tol * float(
                plain.last_hidden.abs().max()))
        for i in range(pm.config.n_layers):  # the keys/values it wrote are the torch path's
            assert fused.k_cache[i].dtype == (torch.float16 if kv == "f16" else torch.float32)
            assert _rel(fused.k_cache[i][1, :, :40], plain.k_cache[i][1, :, :40]) < tol
            assert _rel(fused.v_cache[i][1, :, :40], plain.v_cache[i][1, :, :40]) < tol
        assert fused.k_cache[0][0].abs().max() == 0  # slot 0 untouched
        assert fused.stats.decode_tokens == 32
    finally:
        set_min_chunk_blocks(256)


@pytest.mark.parametrize("kw", [
    {},
    {"n_kv_heads": 1, "mlp": "relu2", "sub_norm": True, "qk_norm": True},
    {"quant": QuantConfig(input_norm=True)},
], ids=["base", "mqa-relu2-subln-qknorm", "input-norm"])
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_fused_batch_step_matches_torch_batch(kw, kv):
    """Several sequences in one C call (continuous batching): rows in slots out of order, each at
    its own position, against the torch forward's batched decode."""
    pm = from_transformer(_model(**kw), fp_dtype="fp32")
    fused = Engine(pm, slots=4, threads=2, kv_dtype=kv)
    plain = Engine(pm, slots=4, threads=2, fused=False, kv_dtype=kv)
    tol = TOL[kv]
    g = torch.Generator().manual_seed(2)
    lens = {3: 5, 0: 11, 2: 2}  # slot -> prompt length; slot 1 stays empty
    for e in (fused, plain):
        for slot, n in lens.items():
            e.prefill(torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(slot)).tolist(), slot=slot)
    slots = list(lens)
    for _ in range(12):
        toks = torch.randint(0, 97, (3,), generator=g).tolist()
        a, b = fused.decode_batch(toks, slots), plain.decode_batch(toks, slots)
        assert a.shape == (3, 97) and _rel(a, b) < tol
        # each row is that sequence's own step: the single-sequence C step agrees
    for i in range(pm.config.n_layers):
        for slot, n in lens.items():
            assert _rel(fused.k_cache[i][slot, :, :n + 12], plain.k_cache[i][slot, :, :n + 12]) < tol
    assert fused.k_cache[0][1].abs().max() == 0 and fused.pos == plain.pos == [23, 0, 14, 17]
    with pytest.raises(ValueError, match="own slot"):
        fused.decode_batch([1, 2], [0, 0])


@pytest.mark.parametrize("kw", [{}, {"sub_norm": True, "mlp": "relu2"}, {"quant": QuantConfig(input_norm=True)}],
                         ids=["base", "subln", "input-norm"])
@pytest.mark.parametrize("kv", ["f16", "q8"])
def test_batch_of_eight_is_each_sequence_alone(kv, kw):
    """8 sequences in one step on 2 threads (attention claims a row's heads at a time there, and
    with a sub-norm normalises and quantises the row for the o projection; alone, the row stage
    does): each row's hidden state (the C layers' output; the float32 head is torch's matmul, whose
    blocking differs by row count) and cached keys / values are bit for bit its sequence's stepped
    alone."""
    pm = from_transformer(_model(**kw), fp_dtype="fp32")
    batch = Engine(pm, slots=8, threads=2, kv_dtype=kv)
    alone = Engine(pm, slots=8, threads=2, kv_dtype=kv)
    prompts = {s: torch.randint(0, 97, (12 + 3 * s,), generator=torch.Generator().manual_seed(s)).tolist()
               for s in range(8)}
    for e in (batch, alone):
        for s, ids in prompts.items():
            e.prefill(ids, slot=s)
    slots = [5, 0, 7, 2, 1, 6, 3, 4]
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        toks = torch.randint(0, 97, (8,), generator=g).tolist()
        batch.decode_batch(toks, slots)
        got = batch.last_hidden.clone()
        for i, (s, t) in enumerate(zip(slots, toks)):
            alone.decode_batch([t], [s])
            assert torch.equal(got[i], alone.last_hidden[0]), (i, s)
    for i in range(pm.config.n_layers):
        assert torch.equal(batch.k_cache[i], alone.k_cache[i]) and torch.equal(batch.v_cache[i], alone.v_cache[i])


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
    out = torch.empty(2, 128)
    with pytest.raises(ValueError, match="position"):
        eng.fused.step([1], [0], [64], out)
    with pytest.raises(ValueError, match="slot"):
        eng.fused.step([1], [1], [0], out)
    with pytest.raises(ValueError, match="slot"):  # more rows than the engine has slots
        eng.fused.step([1, 2], [0, 0], [0, 1], out)
    big = Engine(pm, slots=2)
    with pytest.raises(ValueError, match="slot"):  # two rows writing one slot
        big.fused.step([1, 2], [1, 1], [0, 1], out)
    for bad in (-1, 97, 2**31 - 1):  # the vocabulary is 97 tokens
        with pytest.raises(ValueError, match="vocabulary"):
            big.fused.step([1, bad], [0, 1], [0, 0], out)
        with pytest.raises(ValueError, match="vocabulary"):
            big.fused.prefill([bad, 1], 0, 0, out)
    assert all(not c.any() for c in big.k_cache + big.v_cache)  # refused before any row was written


@pytest.mark.parametrize("fp", ["fp32", "fp16", "bf16"])
def test_fused_step_gathers_the_embedding_rows_torch_does(fp):
    """The C step by token ids reads the embedding table itself (float32, half or bfloat16): the
    same hidden states, bit for bit, as the step given torch's embedding rows (``w[ids].float()``)."""
    import ctypes

    pm = from_transformer(_model(n_kv_heads=2), fp_dtype=fp)
    by_ids, by_rows = Engine(pm, slots=3, threads=2), Engine(pm, slots=3, threads=2)
    w = by_ids.model.embed_tokens.w
    assert w.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fp]
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        toks = torch.randint(0, 97, (3,), generator=g).tolist()
        a, b = torch.empty(3, 128), torch.empty(3, 128)
        by_ids.fused.step(toks, [0, 1, 2], [step] * 3, a)
        x = w[torch.tensor(toks)].float().contiguous()
        arr = (ctypes.c_int * 3)
        rc = by_rows.fused._lib.tt_dec_step_batch(by_rows.fused._h, x.data_ptr(), 3, arr(0, 1, 2), arr(*[step] * 3),
                                                  b.data_ptr(), 2)
        assert rc == 0 and torch.equal(a, b), step


def test_engine_without_compiled_kernels_uses_the_torch_path(monkeypatch):
    """TRITLM_KERNEL=numpy (what a machine without a C compiler gets): no fused step, fp32 head,
    same greedy tokens as the compiled engine."""
    from tritlm.infer.sampling import SamplingParams

    pm = from_transformer(_model(n_kv_heads=2), fp_dtype="fp16")
    want = list(Engine(pm).generate([3, 1, 4], 12, SamplingParams(temperature=0)))
    monkeypatch.setenv("TRITLM_KERNEL", "numpy")
    eng = Engine(pm)
    assert eng.fused is None and eng.head.mm._lib is None
    assert list(eng.generate([3, 1, 4], 12, SamplingParams(temperature=0))) == want


@pytest.mark.parametrize("kind", [{"weight": "int8"}, {"weight": "int4", "group_size": 32},
                                  {"weight": "binary", "scale": "channel"}, {"scale": "channel"}],
                         ids=["int8", "int4-g32", "binary-ch", "ternary-ch"])
def test_fused_step_runs_every_weight_kind(kind):
    """The fused C step dispatches on the context's kind: a model whose Linears are all int8 /
    int4 / binary / per-row ternary decodes through it with the torch path's (and the training
    forward's) results."""
    from tritlm.model.config import quant_overrides_from

    base = _model(n_kv_heads=2)
    cfg = base.cfg.replace(quant_overrides=quant_overrides_from({"*": kind}, base.cfg.quant))
    m = Transformer(cfg).eval()
    m.load_state_dict(base.state_dict())
    pm = from_transformer(m, fp_dtype="fp32")
    fused = Engine(pm, threads=2)
    plain = Engine(pm, threads=2, fused=False)
    assert fused.fused is not None and plain.fused is None
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (20,), generator=gen).tolist()
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0][0]
    for e in (fused, plain):
        e.prefill(ids[:6])
    for t in ids[6:]:
        a, b = fused.forward_seq([t])[-1], plain.forward_seq([t])[-1]
        assert _rel(a, b) < 2e-3
    assert _rel(a, ref[-1]) < 1e-2
    assert fused.stats.decode_tokens == 14


@pytest.mark.parametrize("kw", [
    {"ffn_dim": 204},
    {"n_kv_heads": 1, "mlp": "relu2", "qk_norm": True, "residual_scale": 0.7},
    {"quant": QuantConfig(input_norm=True), "n_kv_heads": 2},
], ids=["base-ffn-tail", "mqa-relu2-qknorm", "input-norm-gqa"])
@pytest.mark.parametrize("kernel", ["auto", "portable"])
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_fused_prefill_matches_torch_path(kw, kernel, kv, monkeypatch):
    """A prompt through the C layers as rows of one sequence (causal: each row sees only earlier
    positions), in several chunks (the first prompt is longer than the scratch rows) and continued
    from a filled slot, against the torch forward's logits at every position and its cache.
    (SubLN is left to the decode tests: over 90 positions of this tiny model one activation lands
    on an int8 rounding boundary, and the flip reaches every later position through the cache;
    the C path then matches its own decode steps, not the torch path, within 2e-3.)"""
    from tritlm.infer import fused_decode

    monkeypatch.setenv("TRITLM_KERNEL", kernel)
    monkeypatch.setattr(fused_decode, "PREFILL_ROWS", 24)
    pm = from_transformer(tiny_model(max_len=128, **kw), fp_dtype="fp32")
    fused = Engine(pm, slots=2, threads=3, kv_dtype=kv)
    plain = Engine(pm, slots=2, threads=3, fused=False, kv_dtype=kv)
    assert fused.fused is not None and fused.fused.rows == 24
    tol = TOL[kv]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (90,), generator=g).tolist()
    a = fused.forward_seq(ids[:61], slot=1, all_logits=True)  # chunks of 24, 24, 13
    b = plain.forward_seq(ids[:61], slot=1, all_logits=True)
    assert a.shape == b.shape == (61, 97) and _rel(a, b) < tol
    assert fused.last_hidden.shape == (61, 128) and _rel(fused.last_hidden, plain.last_hidden) < tol
    a, b = fused.forward_seq(ids[61:], slot=1), plain.forward_seq(ids[61:], slot=1)  # the rest, last logits
    assert a.shape == b.shape == (1, 97) and _rel(a, b) < tol
    for i in range(pm.config.n_layers):
        assert _rel(fused.k_cache[i][1, :, :90], plain.k_cache[i][1, :, :90]) < tol
        assert _rel(fused.v_cache[i][1, :, :90], plain.v_cache[i][1, :, :90]) < tol
    assert fused.k_cache[0][0].abs().max() == 0 and fused.pos == plain.pos == [0, 90]
    # a wrong row (a future token) would change an earlier position's logits: causality
    c = Engine(pm, slots=1, threads=3, kv_dtype=kv).forward_seq(ids[:30] + [(ids[30] + 1) % 97], all_logits=True)
    d = plain.forward_seq(ids[:31], slot=0, all_logits=True)
    assert _rel(c[:30], d[:30]) < tol and _rel(c[30:], d[30:]) > 1e-2


def test_fused_prefill_rejects_bad_positions():
    pm = from_transformer(_model(), fp_dtype="fp32")
    eng = Engine(pm)
    ids, out = list(range(1, 9)), torch.empty(8, 128)
    with pytest.raises(ValueError, match="positions"):
        eng.fused.prefill(ids, 0, 60, out)  # 60..67 past the cache of 64
    with pytest.raises(ValueError, match="slot"):
        eng.fused.prefill(ids, 1, 0, out)


def test_prefill_many_is_each_prompt_prefilled_alone(monkeypatch):
    """Several prompts as the rows of one fused call (chunks that cut across prompts; one slot
    reusing a cached prefix) give each prompt's own prefill: logits, keys/values, fill levels."""
    from tritlm.infer import fused_decode

    monkeypatch.setattr(fused_decode, "PREFILL_ROWS", 16)
    pm = from_transformer(tiny_model(max_len=96, n_kv_heads=2), fp_dtype="fp32")
    many, one, plain = (Engine(pm, slots=4, threads=2), Engine(pm, slots=4, threads=2),
                        Engine(pm, slots=4, threads=2, fused=False))
    g = torch.Generator().manual_seed(5)
    p = {s: torch.randint(0, 97, (n,), generator=g).tolist() for s, n in ((2, 23), (0, 9), (3, 30))}
    for e in (many, one, plain):
        e.prefill(p[3][:12], slot=3)  # slot 3 already holds the first 12 tokens of its prompt
    got = many.prefill_many([(p[2], 2), (p[0], 0), (p[3], 3)])
    for (slot, ids), a in zip(p.items(), got):
        b, c = one.prefill(ids, slot=slot), plain.prefill(ids, slot=slot)
        assert a.shape == (97,) and _rel(a, b) < 1e-5 and _rel(a, c) < 2e-3
        for i in range(pm.config.n_layers):
            assert _rel(many.k_cache[i][slot, :, :len(ids)], one.k_cache[i][slot, :, :len(ids)]) < 1e-5
            assert _rel(many.v_cache[i][slot, :, :len(ids)], one.v_cache[i][slot, :, :len(ids)]) < 1e-5
    assert many.pos == one.pos == [9, 0, 23, 30] and many.tokens == one.tokens
    assert many.stats.prefill_tokens == 23 + 9 + 18 + 12  # slot 3: only its 18 new tokens ran
    assert many.k_cache[0][1].abs().max() == 0
    with pytest.raises(ValueError, match="own slot"):
        many.prefill_many([(p[0], 0), (p[2], 0)])


def test_generator_prefills_requests_that_arrive_together_in_one_call():
    """Requests queued together are prefilled by one prefill_many call; their tokens are those
    each request gets alone (seeded sampling)."""
    from tritlm.infer.generator import Generator, Request
    from tritlm.infer.runtimes import PackedRuntime
    from tritlm.infer.sampling import SamplingParams

    pm = from_transformer(tiny_model(max_len=64, n_kv_heads=2), fp_dtype="fp32")
    rt = PackedRuntime(Engine(pm, slots=3, threads=2), slots=3)
    calls = []
    orig = rt.prefill_many
    rt.prefill_many = lambda prompts: calls.append(len(prompts)) or orig(prompts)
    reqs = [Request(list(range(1 + i, 8 + 3 * i)), 10, SamplingParams(seed=i, temperature=0.8)) for i in range(3)]

    def tokens(gen_reqs, runtime):
        gen = Generator(runtime, max_batch=3)
        seqs = [gen.add(r) for r in gen_reqs]
        evs = list(gen.run())
        return [[e.token for e in evs if e.seq is s and e.token is not None] for s in seqs]

    together = tokens(reqs, rt)
    assert calls == [3]
    alone = [tokens([r], PackedRuntime(Engine(pm, slots=1, threads=2), slots=1))[0] for r in reqs]
    assert together == alone and all(len(t) == 10 for t in together)


def test_step_many_is_decode_and_prefill_apart():
    """Running sequences' next tokens and new prompts in one fused call: the logits, caches and
    fill levels of decode_batch and prefill_many run one after the other."""
    pm = from_transformer(tiny_model(max_len=64, n_kv_heads=2), fp_dtype="fp32")
    a, b = Engine(pm, slots=4, threads=2), Engine(pm, slots=4, threads=2)
    g = torch.Generator().manual_seed(7)
    run = {1: torch.randint(0, 97, (11,), generator=g).tolist(), 3: torch.randint(0, 97, (6,), generator=g).tolist()}
    new = {0: torch.randint(0, 97, (9,), generator=g).tolist(), 2: torch.randint(0, 97, (14,), generator=g).tolist()}
    for e in (a, b):
        for slot, ids in run.items():
            e.prefill(ids, slot=slot)
        e.prefill(new[2][:5], slot=2)  # a reusable prefix in one of the new slots
    dec, got = a.step_many([(5, 1), (7, 3)], [(new[0], 0), (new[2], 2)])
    want_dec = b.decode_batch([5, 7], [1, 3])
    want = b.prefill_many([(new[0], 0), (new[2], 2)])
    assert dec.shape == (2, 97) and _rel(dec, want_dec) < 1e-5
    assert len(got) == 2 and all(_rel(x, y) < 1e-5 for x, y in zip(got, want))
    assert a.pos == b.pos == [9, 12, 14, 7] and a.tokens == b.tokens
    for i in range(pm.config.n_layers):
        assert _rel(a.k_cache[i][:, :, :14], b.k_cache[i][:, :, :14]) < 1e-5
    with pytest.raises(ValueError, match="own slot"):
        a.step_many([(5, 1)], [(new[0], 1)])


def test_request_joining_a_batch_runs_in_the_batch_forward():
    """A request that arrives while others generate is prefilled in the same forward as their next
    tokens (step_many); every request's tokens are those it gets alone."""
    from tritlm.infer.generator import Generator, Request
    from tritlm.infer.runtimes import PackedRuntime
    from tritlm.infer.sampling import SamplingParams

    pm = from_transformer(tiny_model(max_len=64, n_kv_heads=2), fp_dtype="fp32")
    rt = PackedRuntime(Engine(pm, slots=3, threads=2), slots=3)
    calls = []
    orig = rt.step_many
    rt.step_many = lambda d, p: calls.append((len(d), len(p))) or orig(d, p)
    reqs = [Request(list(range(2 + i, 9 + 2 * i)), 8, SamplingParams(seed=i, temperature=0.7)) for i in range(3)]
    gen = Generator(rt, max_batch=3)
    seqs, events = [gen.add(reqs[0])], []
    for k in range(1, 3):  # two more requests join, one step apart
        events += gen.step() + gen.step()
        seqs.append(gen.add(reqs[k]))
    events += list(gen.run())
    together = [[e.token for e in events if e.seq is s and e.token is not None] for s in seqs]
    assert calls == [(1, 1), (2, 1)]

    def alone(r):
        g1 = Generator(PackedRuntime(Engine(pm, slots=1, threads=2), slots=1), max_batch=1)
        s = g1.add(r)
        return [e.token for e in g1.run() if e.seq is s and e.token is not None]

    assert together == [alone(r) for r in reqs] and all(len(t) == 8 for t in together)


@pytest.mark.parametrize("kv", ["f32", "f16", "q8"])
def test_every_x86_route_gives_the_same_fused_forward(kv, monkeypatch):
    """A ternary model's prompt (AMX for chunks of 16+ rows, VNNI below), batched and single decode
    steps give the same logits bit for bit on the amx, avx512 and avx2 routes: the kernels are
    exact integer dots with one epilogue, and the 16-lane SiLU repeats the 8-lane one's operations
    per element. Routes this CPU lacks are skipped (a CPU without AVX2 has only portable)."""
    from tritlm.infer import fused_decode
    from tritlm.kernels.cpu import resolve_backend

    routes = [r for r in ("amx", "avx512", "avx2") if resolve_backend(r) == r]
    if len(routes) < 2:
        pytest.skip(f"one x86 route here ({routes})")
    monkeypatch.setattr(fused_decode, "PREFILL_ROWS", 24)
    pm = from_transformer(tiny_model(max_len=96, ffn_dim=204, n_kv_heads=2), fp_dtype="fp32")
    ids = torch.randint(0, 97, (61,), generator=torch.Generator().manual_seed(4)).tolist()
    got = {}
    for r in routes:
        monkeypatch.setenv("TRITLM_KERNEL", r)
        eng = Engine(pm, slots=3, threads=2, kv_dtype=kv)
        assert eng.fused is not None
        out = [eng.forward_seq(ids, slot=0, all_logits=True),  # chunks of 24, 24, 13 rows
               eng.forward_seq(ids[:20], slot=1, all_logits=True)]
        out.append(eng.decode_batch([5, 6], [0, 1]))
        out.append(eng.forward_seq([7], slot=2))
        got[r] = out
    for r in routes[1:]:
        for a, b in zip(got[routes[0]], got[r]):
            assert torch.equal(a, b), (routes[0], r)
