"""Speculative decoding is exactly greedy decoding of the target, sampled speculative decoding is
distributed as the target's sampling; the prefix cache changes no logits."""

from __future__ import annotations

import torch

from tritlm.formats.packed import from_transformer
from tritlm.infer.engine import Engine
from tritlm.infer.prefix_cache import PrefixCache
from tritlm.infer.sampling import SamplingParams
from tritlm.infer.speculative import SpecStats, speculative_generate
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer


def _pm(seed: int, layers: int = 2, dim: int = 128):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, dim=dim, n_layers=layers, n_heads=4, ffn_dim=256, max_seq_len=128)
    return from_transformer(Transformer(cfg).eval(), fp_dtype="fp32")


def test_speculative_equals_greedy_target():
    target_pm = _pm(0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want = list(Engine(target_pm).generate(prompt, 40, SamplingParams(temperature=0)))
    for draft_pm, k in ((target_pm, 4), (_pm(1, layers=1), 3), (_pm(2, layers=1), 1)):
        st = SpecStats()
        got = list(speculative_generate(Engine(target_pm), Engine(draft_pm), prompt, 40, k=k, stats=st))
        assert got == want
    # the target as its own draft accepts everything
    st = SpecStats()
    list(speculative_generate(Engine(target_pm), Engine(target_pm), prompt, 21, k=4, stats=st))
    assert st.acceptance == 1.0


def test_speculative_stops_on_stop_id():
    pm = _pm(0)
    prompt = [3, 1, 4]
    full = list(Engine(pm).generate(prompt, 30, SamplingParams(temperature=0)))
    stop = full[10]
    got = list(speculative_generate(Engine(pm), Engine(_pm(1, layers=1)), prompt, 30, k=4, stop_ids={stop}))
    assert got == full[:full.index(stop) + 1]


def test_prefix_cache_reuses_and_matches():
    pm = _pm(0)
    eng = Engine(pm, slots=2)
    pc = PrefixCache(eng, min_tokens=4)
    system = list(range(1, 30))
    a = pc.prefill(system + [40, 41], slot=0)
    eng.forward_seq([7, 7, 7], slot=0, start=0)  # clobber the slot with another prompt
    before = eng.stats.prefill_tokens
    b = pc.prefill(system + [50, 51, 52], slot=1)
    assert eng.stats.prefill_tokens - before == 3  # only the new suffix ran
    ref = Engine(pm).logits(system + [50, 51, 52])[-1]
    assert torch.allclose(b, ref, atol=1e-4, rtol=1e-4)
    assert pc.hits == 1 and pc.reused_tokens == len(system)
    assert a.shape == b.shape


def _small(seed: int, layers: int = 1):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=8, dim=64, n_layers=layers, n_heads=4, ffn_dim=128, max_seq_len=32)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # sharper, more distinct distributions than a fresh init gives
        m.lm_head.weight.mul_(8)
    return from_transformer(m, fp_dtype="fp32")


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def test_speculative_sampling_is_distributed_as_the_target():
    """Second token of a sampled speculative generation vs the target's exact marginal
    P(t2) = sum_t1 p(t1) p(t2 | t1), computed from the target's logits."""
    target_pm, draft_pm = _small(0, layers=2), _small(5)
    prompt = [1, 2, 3]
    ref = Engine(target_pm)

    def marginal(eng):
        p1 = (eng.logits(prompt)[-1] / 0.7).softmax(-1)
        return sum(p1[t] * (eng.logits(prompt + [t])[-1] / 0.7).softmax(-1) for t in range(8))

    want, draft_only = marginal(ref), marginal(Engine(draft_pm))
    assert _tv(want, draft_only) > 0.3  # accepting the draft blindly would fail the check below
    tgt, dft = Engine(target_pm), Engine(draft_pm)
    n, counts, st = 1200, torch.zeros(8), SpecStats()
    for seed in range(n):
        p = SamplingParams(temperature=0.7, seed=seed)
        toks = list(speculative_generate(tgt, dft, prompt, 2, k=2, params=p, stats=st))
        counts[toks[1]] += 1
    assert _tv(counts / n, want) < 0.07, (counts / n, want)
    assert 0.05 < st.acceptance < 0.6  # both branches ran: accepted proposals and resampled rejections


def test_speculative_through_the_api_and_cli(tmp_path, capsys):
    import tritlm
    from tritlm.cli import main
    from tritlm.data.tokenizer import CharTokenizer
    from tritlm.formats.packed import save_packed

    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz :\n")
    paths = []
    for seed, layers in ((0, 2), (1, 1)):
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=layers, n_heads=4, ffn_dim=128, max_seq_len=96)
        pm = from_transformer(Transformer(cfg).eval(), tok, fp_dtype="fp32")
        paths.append(save_packed(pm, tmp_path / f"m{seed}"))
    m, d = tritlm.load(paths[0]), tritlm.load(paths[1])
    kw = {"temperature": 0, "frequency_penalty": 0.7, "stop": ["zz"]}
    want = m.generate("king: ", 40, **kw)
    assert m.generate("king: ", 40, draft=d, draft_k=3, **kw) == want  # greedy: exactly the target's
    assert main(["generate", str(paths[0]), "--prompt", "king: ", "--max-tokens", "40", "--draft", str(paths[1]),
                 "--temperature", "0", "--frequency-penalty", "0.7", "--stop", "zz"]) == 0
    assert capsys.readouterr().out == "king: " + want + "\n"
    sampled = m.generate("king: ", 30, temperature=0.9, seed=3, draft=d)
    assert sampled == m.generate("king: ", 30, temperature=0.9, seed=3, draft=d) and len(sampled) <= 30


def test_prefix_cache_bounds_its_entries():
    eng = Engine(_pm(0))
    pc = PrefixCache(eng, min_tokens=2, max_entries=3)
    for i in range(6):
        pc.prefill([10 + i, 1, 2, 3])
    assert list(pc.entries) == [(13, 1, 2, 3), (14, 1, 2, 3), (15, 1, 2, 3)]  # least recently used went first
    assert pc.bytes == 3 * pc._entry_bytes(4)
