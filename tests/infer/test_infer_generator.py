"""The step-level generator itself: chunked prefill, admission between steps, slot reuse."""

from __future__ import annotations

import torch
from tiny_models import tiny_model  # noqa: E402  (tests/infer helper)

from tritlm.formats.packed import from_transformer
from tritlm.infer.engine import Engine
from tritlm.infer.generator import Generator, Request, generate
from tritlm.infer.runtimes import PackedRuntime, TorchRuntime
from tritlm.infer.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, frequency_penalty=0.5)
PROMPTS = [[1, 2, 3], list(range(10, 33)), [7, 7, 7, 7, 7]]


def _tokens(rt, reqs, **kw) -> list[list[int]]:
    out: dict[int, list[int]] = {id(r): [] for r in reqs}
    for ev in generate(rt, reqs, **kw):
        if ev.token is not None:
            out[id(ev.seq.req)].append(ev.token)
    return [out[id(r)] for r in reqs]


def _runtimes():
    m = tiny_model(n_kv_heads=2)
    return [TorchRuntime(m, slots=3), PackedRuntime(Engine(from_transformer(m, fp_dtype="fp32"), slots=3))]


def test_chunked_prefill_gives_the_same_tokens():
    for rt in _runtimes():
        reqs = [Request(p, 12, GREEDY) for p in PROMPTS]
        alone = [_tokens(rt, [r])[0] for r in reqs]
        assert _tokens(rt, reqs, prefill_chunk=4) == alone
        assert _tokens(rt, reqs, prefill_chunk=1000) == alone


def test_a_long_prompt_prefills_in_chunks_while_the_batch_decodes():
    rt = TorchRuntime(tiny_model(), slots=2)
    gen = Generator(rt, prefill_chunk=8)
    a = gen.add(Request([1, 2, 3], 20, GREEDY))
    assert [e.seq for e in gen.step()] == [a]  # a's prompt fits the first chunk: it samples at once
    b = gen.add(Request(list(range(5, 25)), 5, GREEDY))  # 20 tokens: three steps of 8, 8, 4
    seen = [[e.seq for e in gen.step()] for _ in range(3)]
    assert seen == [[a], [a], [a, b]]  # a's next token every step; b's first once its prompt is in
    assert b.prefilled == 20


def test_torch_runtime_reuses_a_slots_prefix():
    m = tiny_model()
    rt, fresh = TorchRuntime(m), TorchRuntime(m)
    calls = []
    m.register_forward_pre_hook(lambda _mod, args: calls.append(args[0].shape[1]))
    rt.prefill([1, 2, 3, 4, 5, 6], 0)
    rt.decode([9], [0])
    got = rt.prefill([1, 2, 3, 4, 5, 6, 9, 11, 12], 0)  # extends what slot 0 holds
    assert calls[-1] == 2  # only the two new tokens ran
    assert torch.allclose(got, fresh.prefill([1, 2, 3, 4, 5, 6, 9, 11, 12], 0), atol=1e-5)
    other = rt.prefill([1, 2, 8], 0)  # diverges after two tokens: the rest is recomputed
    assert calls[-1] == 1 and torch.allclose(other, TorchRuntime(m).prefill([1, 2, 8], 0), atol=1e-5)


def test_packed_runtime_prefix_cache_across_slots():
    pm = from_transformer(tiny_model(), fp_dtype="fp32")
    eng = Engine(pm, slots=2)
    rt = PackedRuntime(eng, prefix_cache_bytes=1 << 20)
    system = list(range(1, 21))
    rt.prefill(system + [30, 31], 0)
    before = eng.stats.prefill_tokens
    got = rt.prefill(system + [40, 41, 42], 1)  # another slot: its own cache holds nothing
    assert rt.prefix.hits == 1 and rt.prefix.reused_tokens == 20
    assert eng.stats.prefill_tokens - before == 3  # only what follows the shared prefix ran
    want = Engine(pm).prefill(system + [40, 41, 42])
    assert torch.allclose(got, want, atol=1e-4)


def test_packed_cache_grows_only_as_far_as_concurrency_asks():
    pm = from_transformer(tiny_model(), fp_dtype="fp32")
    eng = Engine(pm)
    rt = PackedRuntime(eng, slots=8)  # a server's --max-batch 8
    assert eng.slots == 1
    reqs = [Request(p, 6, GREEDY) for p in PROMPTS]
    got = _tokens(rt, reqs)
    assert eng.slots == 4  # 3 sequences at once: 1 -> 2 -> 4 slots, not 8
    assert got == [list(Engine(pm).generate(r.prompt_ids, 6, GREEDY)) for r in reqs]


def test_contrastive_sequence_steps_beside_the_batch():
    from tritlm.infer.contrastive import contrastive_generate

    pm = from_transformer(tiny_model(), fp_dtype="fp32")
    rt = PackedRuntime(Engine(pm, slots=2))
    c = Request([4, 5, 6], 10, SamplingParams(top_k=3), penalty_alpha=0.6)
    s = Request(PROMPTS[0], 10, GREEDY)
    got = _tokens(rt, [c, s])  # both in one generator: one in the batch, one on its own forwards
    assert got[0] == list(contrastive_generate(Engine(pm), [4, 5, 6], 10, k=3, alpha=0.6))
    assert got[1] == list(Engine(pm).generate(PROMPTS[0], 10, GREEDY))
    torch_rt = TorchRuntime(tiny_model())
    (ev,) = list(generate(torch_rt, [c]))
    assert ev.finish == "error" and "packed" in ev.error


def test_torch_runtime_decodes_a_batch_in_one_forward():
    """Slots at different positions decode together: one forward, each row at its own position,
    the same logits as decoding each slot alone."""
    m = tiny_model(n_kv_heads=2)
    rt, alone = TorchRuntime(m, slots=3), TorchRuntime(m, slots=3)
    for s, p in enumerate(PROMPTS):
        rt.prefill(p, s), alone.prefill(p, s)
    calls = []
    h = m.register_forward_pre_hook(lambda _mod, args: calls.append(tuple(args[0].shape)))
    batch = rt.decode([4, 5, 6], [0, 1, 2])
    assert calls == [(3, 1)]
    h.remove()
    for s, t in enumerate([4, 5, 6]):
        assert torch.allclose(batch[s], alone.decode([t], [s])[0], atol=1e-5)
    assert [rt.filled(s) for s in range(3)] == [len(p) + 1 for p in PROMPTS]


def test_packed_runtime_samples_with_the_engines_torch_threads(monkeypatch):
    """Sampling's small torch ops run on the engine's torch threads (1), not on torch's OpenMP
    pool, whose spin-wait after each op took a core from the next C step; the torch runtime's
    steps leave torch as it is."""
    import tritlm.infer.generator as gen_mod

    seen: list[int] = []
    real = gen_mod.sample_batch

    def spy(samplers, logits):
        seen.append(torch.get_num_threads())
        return real(samplers, logits)

    monkeypatch.setattr(gen_mod, "sample_batch", spy)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch_rt, packed_rt = _runtimes()
        reqs = [Request(p, 3, SamplingParams(temperature=1.0, seed=1)) for p in PROMPTS[:2]]
        _tokens(packed_rt, reqs)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2  # restored after each step
        seen.clear()
        _tokens(torch_rt, reqs)
        assert seen and set(seen) == {2}
    finally:
        torch.set_num_threads(old)
