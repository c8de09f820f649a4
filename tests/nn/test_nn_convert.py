"""convert(): which modules get swapped, that weights survive, and the runtime-state helpers."""

import pytest
import torch
from torch import nn

from tritlm.nn import BitLinear, RMSNorm, clamp_latent_, convert, make_linear, set_quant_state
from tritlm.nn.convert import bitlinear_modules
from tritlm.quant import BINARY, FP, TERNARY, QuantConfig


class Sub(nn.Linear):
    """A Linear subclass: convert() must leave it alone (it may carry its own semantics)."""


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16), "o_proj": nn.Linear(16, 16, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.norm = RMSNorm(16)
        self.special = Sub(16, 16)
        self.lm_head = nn.Linear(16, 11, bias=False)

    def forward(self, idx):
        h = self.embed(idx)
        h = h + self.attn["o_proj"](self.attn["q_proj"](h))
        h = h + self.mlp(h)
        h = self.special(self.norm(h))
        return self.lm_head(h)


def _types(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_convert_fp_preserves_outputs_and_skips_lm_head():
    torch.manual_seed(0)
    model = Toy()
    idx = torch.randint(0, 11, (2, 5))
    before = model(idx)
    ref_params = {k: v.clone() for k, v in model.state_dict().items()}
    out = convert(model, FP)
    assert out is model
    t = _types(model)
    assert t["attn.q_proj"] is BitLinear and t["mlp.0"] is BitLinear and t["mlp.2"] is BitLinear
    assert t["lm_head"] is nn.Linear and t["special"] is Sub
    assert torch.equal(model(idx), before)
    assert set(model.state_dict()) == set(ref_params)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_params[k]), k
    assert model.attn["q_proj"].bias is not None and model.attn["o_proj"].bias is None


def test_convert_ternary_changes_outputs_and_keeps_grad_flags():
    torch.manual_seed(0)
    model = Toy()
    model.mlp[0].weight.requires_grad_(False)
    idx = torch.randint(0, 11, (2, 5))
    before = model(idx)
    convert(model, TERNARY)
    assert not model.mlp[0].weight.requires_grad and model.mlp[2].weight.requires_grad
    assert not torch.allclose(model(idx), before)
    # running convert again swaps nothing more (BitLinear is not an exact nn.Linear)
    first = dict(model.named_modules())
    convert(model, BINARY)
    assert all(first[n] is m for n, m in model.named_modules())
    assert model.mlp[0].config == TERNARY


def test_convert_pattern_dict_first_match_wins():
    model = Toy()
    a4 = QuantConfig(act_bits=4)
    convert(model, {"attn.q_proj": None, "attn.*": a4, "mlp.0": BINARY, "*": TERNARY, "lm_head": FP})
    assert type(model.attn["q_proj"]) is nn.Linear  # None keeps it
    assert model.attn["o_proj"].config == a4
    assert model.mlp[0].config == BINARY and model.mlp[2].config == TERNARY
    assert model.lm_head.config == TERNARY  # "*" came first
    model = Toy()
    convert(model, {"mlp.*": TERNARY})
    assert _types(model)["attn.q_proj"] is nn.Linear and _types(model)["mlp.2"] is BitLinear


def test_convert_callable_and_custom_skip():
    model = Toy()
    seen = []

    def spec(name, mod):
        seen.append(name)
        return TERNARY if mod.out_features == 16 else None
    convert(model, spec)
    assert "special" not in seen and "lm_head" in seen
    t = _types(model)
    assert t["attn.q_proj"] is BitLinear and t["mlp.0"] is nn.Linear and t["mlp.2"] is BitLinear
    model = Toy()
    convert(model, TERNARY, skip=("mlp.*", "q_proj"))
    t = _types(model)
    assert t["mlp.0"] is nn.Linear and t["attn.q_proj"] is nn.Linear and t["lm_head"] is BitLinear
    with pytest.raises(TypeError):
        convert(Toy(), 3)  # type: ignore[arg-type]


def test_convert_transformer_matches_building_it_ternary():
    from tritlm.model.config import ModelConfig
    from tritlm.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=23, dim=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=16)
    built = Transformer(cfg)
    converted = convert(Transformer(cfg.fp_twin()), cfg.quant)
    assert _types(built) == _types(converted)
    assert type(converted.lm_head) is nn.Linear
    assert all(m.config == cfg.quant for m in bitlinear_modules(converted))


def test_set_quant_state_reaches_every_bitlinear():
    model = convert(Toy(), TERNARY)
    n = len(list(bitlinear_modules(model)))
    assert n == 4
    assert set_quant_state(model, lam=0.25, anneal_alpha=3.0, residual_coef=0.1) == n
    for m in bitlinear_modules(model):
        assert (m.lam, m.anneal_alpha, m.residual_coef) == (0.25, 3.0, 0.1)
    set_quant_state(model, residual_coef=0.0)  # only the arguments passed change
    for m in bitlinear_modules(model):
        assert (m.lam, m.anneal_alpha, m.residual_coef) == (0.25, 3.0, 0.0)
    set_quant_state(model, anneal_alpha=None)
    assert all(m.anneal_alpha is None and m.lam == 0.25 for m in bitlinear_modules(model))
    with pytest.raises(ValueError):
        set_quant_state(model, lam=1.5)


def test_clamp_latent_model_and_make_linear():
    model = convert(Toy(), {"mlp.*": QuantConfig(latent_clamp=0.05), "attn.*": TERNARY})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(100)
    clamp_latent_(model)
    assert model.mlp[0].weight.abs().max() <= 0.05 and model.mlp[2].weight.abs().max() <= 0.05
    assert model.attn["q_proj"].weight.abs().max() > 0.05  # no clamp configured there
    assert type(make_linear(4, 5, None)) is nn.Linear
    assert type(make_linear(4, 5, FP)) is nn.Linear
    assert make_linear(4, 5, FP, bias=True).bias is not None
    assert type(make_linear(4, 5, TERNARY)) is BitLinear
    assert type(make_linear(4, 5, QuantConfig(weight="fp"))) is BitLinear  # int8 activations
    assert type(make_linear(4, 5, QuantConfig(weight="fp", act_bits=None, input_norm=True))) is BitLinear
