"""Samplers on hand-built distributions."""

from __future__ import annotations

import math

import pytest
import torch

from tritlm.infer.sampling import (
    Sampler,
    SamplingParams,
    apply_frequency_presence,
    apply_logit_bias,
    ban_sequences,
    contrastive_select,
    draw_rows,
    mirostat_v2_step,
    process_logits,
    sample,
    sample_batch,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

LOGP = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_greedy_and_legacy_positional_params():
    p = SamplingParams(0.0, 0, 1.0, 0.0, 1.0, None)  # the trainer CLI builds it positionally
    assert p.greedy and sample(LOGP, p) == 0


def test_top_k_top_p_min_p():
    assert kept(top_k_filter(LOGP, 2)) == [0, 1]
    assert kept(top_p_filter(LOGP, 0.7)) == [0, 1]  # 0.5 < 0.7, 0.75 >= 0.7
    assert kept(top_p_filter(LOGP, 0.76)) == [0, 1, 2]
    assert kept(process_logits(LOGP, SamplingParams(min_p=0.35))) == [0, 1]  # p >= 0.175


def test_temperature_changes_sharpness():
    hot = process_logits(LOGP, SamplingParams(temperature=2.0)).softmax(-1)
    cold = process_logits(LOGP, SamplingParams(temperature=0.5)).softmax(-1)
    assert cold[0] > 0.5 > hot[0]


def test_typical_keeps_tokens_near_entropy():
    # entropy of [0.5,0.25,0.15,0.07,0.03] is ~1.30 nats; surprises: 0.69, 1.39, 1.90, 2.66, 3.51
    assert kept(typical_filter(LOGP, 0.2)) == [1]
    assert kept(typical_filter(LOGP, 0.7)) == [0, 1]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0])
    rp = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), torch.tensor([0, 1]))
    assert rp.tolist() == [1.0, -4.0, 1.0]
    fp = apply_frequency_presence(logits, torch.tensor([0, 0, 2]), frequency=0.5, presence=1.0)
    assert fp.tolist() == [0.0, -2.0, -0.5]


def test_bans_allowed_and_sequences():
    p = SamplingParams(temperature=0, banned_tokens=(0,))
    assert sample(LOGP, p) == 1
    p = SamplingParams(temperature=0, allowed_tokens=(3, 4))
    assert sample(LOGP, p) == 3
    # banned word [2, 0]: after a 2, token 0 is banned; elsewhere it is fine
    assert kept(ban_sequences(LOGP, [4, 2], [(2, 0)])) == [1, 2, 3, 4]
    assert kept(ban_sequences(LOGP, [4, 1], [(2, 0)])) == [0, 1, 2, 3, 4]


def test_must_include_bans_stop_then_forces():
    eos = 0
    s = Sampler(SamplingParams(temperature=0, must_include=(3,)), prompt_len=1, stop_ids={eos}, max_tokens=3)
    hist = [4]
    out = []
    for _ in range(3):
        t = s(LOGP, torch.tensor(hist))
        out.append(t)
        hist.append(t)
    assert eos not in out[:2] and out[-1] == 3  # forced when the budget runs out


def test_seed_reproducible_and_distribution():
    p = SamplingParams(temperature=1.0, seed=123)
    a = [Sampler(p)(LOGP, torch.tensor([], dtype=torch.long)) for _ in range(1)]
    s1, s2 = Sampler(p), Sampler(p)
    h = torch.tensor([], dtype=torch.long)
    assert [s1(LOGP, h) for _ in range(50)] == [s2(LOGP, h) for _ in range(50)]
    g = torch.Generator().manual_seed(0)
    draws = [sample(LOGP, SamplingParams(), None, g) for _ in range(2000)]
    assert abs(draws.count(0) / 2000 - 0.5) < 0.05 and a


def test_mirostat_v2_truncates_and_adapts():
    g = torch.Generator().manual_seed(0)
    # mu = 1.5 bits: only tokens with surprise <= 1.5 bits (p >= 0.354) survive -> token 0 only
    tok, mu = mirostat_v2_step(LOGP, 1.5, tau=3.0, eta=0.1, generator=g)
    assert tok == 0 and mu == pytest.approx(1.5 - 0.1 * (0.0 - 3.0))
    # a target surprise (8 bits) above anything observed here: mu keeps growing from 2 tau = 16
    s = Sampler(SamplingParams(mirostat=2, mirostat_tau=8.0, seed=0))
    for _ in range(30):
        s(LOGP, torch.tensor([], dtype=torch.long))
    assert s.mu > 16.0
    # a surprise above target moves mu down by eta * (observed - tau)
    tok, mu = mirostat_v2_step(torch.tensor([0.0, 0.0]), 5.0, tau=0.5, eta=0.1, generator=g)
    assert mu == pytest.approx(5.0 - 0.1 * (1.0 - 0.5))


def test_contrastive_select_penalises_repetition():
    probs = torch.tensor([0.6, 0.4])
    prev = torch.tensor([[1.0, 0.0]])
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # candidate 0 repeats the context
    assert contrastive_select(probs, cand, prev, alpha=0.0) == 0
    assert contrastive_select(probs, cand, prev, alpha=0.6) == 1


def test_presence_frequency_penalty_and_logit_bias_formula():
    # OpenAI: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counts over the generated tokens
    out = apply_frequency_presence(torch.zeros(5), torch.tensor([1, 1, 3]), frequency=0.25, presence=0.5)
    assert torch.allclose(out, torch.tensor([0.0, -(2 * 0.25 + 0.5), 0.0, -(0.25 + 0.5), 0.0]))
    assert apply_logit_bias(torch.zeros(4), ((0, -100.0), (2, 100.0))).tolist() == [-100.0, 0.0, 100.0, 0.0]
    # in the chain: the prompt does not count for frequency / presence, the repetition penalty does
    p = SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=2.0,
                       logit_bias={4: 0.25})
    got = process_logits(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]), p, torch.tensor([0, 1, 1]), torch.tensor([1, 1]))
    assert got.tolist() == [0.5, 0.5 - 2.0 - 0.5, 1.0, 1.0, 1.25]


def test_sampler_penalises_only_its_generated_tokens():
    # the stateful sampler (every front end's) applies frequency / presence over history[prompt_len:]
    s = Sampler(SamplingParams(temperature=0, presence_penalty=2.0), prompt_len=2)
    logits = torch.tensor([3.0, 2.0, 2.5])
    assert s(logits, torch.tensor([0, 0])) == 0  # token 0 only in the prompt: not penalised
    assert s(logits, torch.tensor([1, 1, 0])) == 2  # generated once: 3 - 2 < 2.5


def test_sampling_params_normalise_and_check_token_settings():
    from tritlm.errors import ConfigError

    p = SamplingParams(logit_bias={"5": 1, 2: -3.5}, stop="END", banned_tokens=[3])
    assert p.logit_bias == ((2, -3.5), (5, 1.0)) and p.stop == ("END",) and p.banned_tokens == (3,)
    hash(p)  # frozen and hashable
    for kw in ({"logit_bias": {"x": 1}}, {"logit_bias": {1: float("nan")}}, {"banned_tokens": (-1,)}):
        with pytest.raises(ConfigError):
            SamplingParams(**kw)


def test_engine_generate_uses_sampler_features():
    from tritlm.formats.packed import random_packed
    from tritlm.infer.engine import Engine
    from tritlm.model.config import ModelConfig

    pm = random_packed(ModelConfig(vocab_size=50, dim=128, n_layers=1, n_heads=4, ffn_dim=128, max_seq_len=64))
    eng = Engine(pm)
    out = list(eng.generate([1, 2], 10, SamplingParams(temperature=0, allowed_tokens=(7, 8))))
    assert set(out) <= {7, 8} and len(out) == 10
    out = list(eng.generate([1, 2], 5, SamplingParams(temperature=0.9, seed=1, banned_tokens=tuple(range(25)))))
    assert min(out) >= 25
    from tritlm.infer.contrastive import contrastive_generate

    cs = list(contrastive_generate(eng, [1, 2, 3], 6, k=3, alpha=0.6))
    assert len(cs) == 6 and not math.isnan(sum(cs))


@pytest.mark.parametrize("kw", [{"temperature": float("nan")}, {"temperature": -1.0}, {"top_p": 0.0},
                                {"top_p": -1.0}, {"min_p": 2.0}, {"repetition_penalty": 0.0},
                                {"top_k": -1}, {"typical_p": 0.0}, {"max_tokens": -1}, {"mirostat": 1},
                                {"temperature": float("inf")}, {"frequency_penalty": float("nan")}])
def test_impossible_sampling_values_are_config_errors(kw):
    from tritlm.errors import ConfigError

    with pytest.raises(ConfigError):
        SamplingParams(**kw)


def test_extreme_valid_values_still_sample():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    hist = torch.tensor([1, 2])
    assert sample(logits, SamplingParams(temperature=1e-300), hist, g) == 1  # the top token
    for p in (SamplingParams(repetition_penalty=1e-300, temperature=0.8), SamplingParams(temperature=1e-300,
              repetition_penalty=1e-300), SamplingParams(temperature=50.0, top_p=1e-12)):
        t = sample(logits, p, hist, g)
        assert 0 <= t < 4


# plain settings (no history needed): the batch sampler must give each the tokens its own Sampler gives
BATCH_SETTINGS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.3, seed=2, logit_bias={3: 2.5, 7: -100.0, 40: 1e-7}),
    SamplingParams(temperature=1.0, seed=3, top_k=5),
    SamplingParams(temperature=0.9, seed=4, top_p=0.8, min_p=0.02),
    SamplingParams(temperature=1.1, seed=5, typical_p=0.7),
    SamplingParams(temperature=1e-300, seed=6),
    SamplingParams(temperature=0, logit_bias={11: 50.0}),
    SamplingParams(temperature=2.0, seed=7, logit_bias={0: -100.0, 1: -100.0}),
    SamplingParams(temperature=1.0, seed=8, logit_bias={5: 3.0}),  # OpenAI's default temperature
    SamplingParams(temperature=1.0, seed=9),
]


@pytest.mark.parametrize("grouping", ["all", "one", "same-temperature"])
def test_sample_batch_matches_each_sampler_alone(grouping, monkeypatch):
    """The whole batch, each row as a batch of one (its temperature a scalar), and the rows that
    share a temperature together (1.0: the chain skips the float64 division) each give the
    tokens and RNG states of the rows' own Samplers, and draw from the same probabilities bit
    for bit (a token rarely shows a last-bit difference; the probabilities do)."""
    import tritlm.infer.sampling as sampling_mod

    drawn: list[torch.Tensor] = []  # every probability row handed to the one draw, in call order
    real_draw_rows = sampling_mod.draw_rows

    def recording_draw_rows(probs, generators):
        drawn.extend(probs.clone().unbind(0))
        return real_draw_rows(probs, generators)

    monkeypatch.setattr(sampling_mod, "draw_rows", recording_draw_rows)
    vocab = 64
    gen = torch.Generator().manual_seed(0)
    alone = [Sampler(p, prompt_len=2) for p in BATCH_SETTINGS]
    batched = [Sampler(p, prompt_len=2) for p in BATCH_SETTINGS]
    assert all(s.plain for s in batched)
    n = len(BATCH_SETTINGS)
    if grouping == "all":
        groups = [list(range(n))]
    elif grouping == "one":
        groups = [[i] for i in range(n)]
    else:
        temps = sorted({p.temperature for p in BATCH_SETTINGS})
        groups = [[i for i, p in enumerate(BATCH_SETTINGS) if p.temperature == t] for t in temps]
        assert any(len(g) > 1 for g in groups)
    history = torch.tensor([1, 2])
    for step in range(40):
        rows = torch.randn(n, vocab, generator=gen) * (1 + step % 4)
        if step % 5 == 0:  # the values the chain cleans up: nan, +-inf, a row with one finite logit
            rows[0, 3], rows[2, 5], rows[4, 6] = float("nan"), float("inf"), float("-inf")
            rows[5, :] = float("-inf")
            rows[5, 9] = 0.5
            rows[9, :] = float("-inf")  # a temperature-1 row whose one finite logit is the biased one
            rows[9, 5] = -2.0
        if step % 5 == 2:  # a greedy row whose top is +inf (nan_to_num makes it float32's max)
            rows[0, 9], rows[0, 20] = float("inf"), torch.finfo(torch.float32).max
            rows[10, 7] = float("inf")
        drawn.clear()
        want = [s(r.clone(), history) for s, r in zip(alone, rows)]
        hot = [i for i, p in enumerate(BATCH_SETTINGS) if not p.greedy]
        want_probs, drawn[:] = dict(zip(hot, drawn)), []
        got = {}
        for group in groups:
            # every subset order too: the batch must not couple rows (the greedy ones leave it early)
            order = group if step % 2 else group[::-1]
            got.update(zip(order, sample_batch([batched[i] for i in order], [rows[i] for i in order])))
        assert got == dict(enumerate(want)), step
        got_probs = dict(zip([i for g in groups for i in (g if step % 2 else g[::-1]) if i in want_probs], drawn))
        assert got_probs.keys() == want_probs.keys()
        for i, p in want_probs.items():
            assert torch.equal(got_probs[i], p), (step, i)
    for a, b in zip(alone, batched):  # the RNGs moved alike: the next draws agree too
        assert a.steps == b.steps
        if a.gen is not None:
            assert torch.equal(a.gen.get_state(), b.gen.get_state())


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.1), dict(frequency_penalty=0.5), dict(presence_penalty=0.1),
                                dict(banned_tokens=(1,)), dict(allowed_tokens=(1, 2)), dict(must_include=(3,)),
                                dict(banned_sequences=((1, 2),)), dict(mirostat=2)])
def test_samplers_that_need_history_are_not_batched(kw):
    s = Sampler(SamplingParams(temperature=0.8, **kw))
    assert not s.plain
    with pytest.raises(ValueError, match="plain"):
        sample_batch([s], [torch.zeros(8)])


def test_draw_rows_follows_each_distribution_and_never_draws_zero_mass():
    # rows: unnormalised, zeros inside and at both ends, one token with all the mass
    probs = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 3e-30],
                          [0.5, 0.0, 0.0, 0.0, 0.0, 0.5]])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    n = 6000
    counts = torch.zeros_like(probs)
    for _ in range(n):
        for r, t in enumerate(draw_rows(probs, gens)):
            counts[r, t] += 1
    assert not bool(counts[probs == 0].any())
    want = probs / probs.sum(-1, keepdim=True) * n
    # 4.5 sigma of a binomial count: fails by chance about once in 10^5 runs, not at all with these seeds
    assert bool(((counts - want).abs() <= 4.5 * (want * (1 - want / n)).sqrt() + 1e-9).all()), counts
