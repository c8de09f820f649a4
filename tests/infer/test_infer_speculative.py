"""Speculative decoding is exactly greedy decoding of the target; the prefix cache changes no logits."""

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
