"""BitLinear with int8 / int4 / per-channel kinds: forward against float64 math, straight-through
backward, and a model whose Linears each have their own kind (the per-layer spec)."""

import json

import numpy as np
import pytest
import torch

from tritlm.model.config import ModelConfig, quant_overrides_from
from tritlm.model.transformer import Transformer
from tritlm.nn import BitLinear
from tritlm.quant import QuantConfig

KINDS = [QuantConfig(weight="int8"), QuantConfig(weight="int4", group_size=32),
         QuantConfig(weight="int4", group_size=128), QuantConfig(scale="channel"),
         QuantConfig(weight="binary", scale="channel"), QuantConfig(weight="binary")]


def _ref_weight(w: np.ndarray, cfg: QuantConfig) -> np.ndarray:
    """Dequantised weight in float64, written from the definitions."""
    eps = cfg.eps
    if cfg.weight == "int8":
        s = np.maximum(np.abs(w).max(1, keepdims=True), eps) / 127
        return np.clip(np.round(w / s), -127, 127) * s
    if cfg.weight == "int4":
        g = cfg.group_size
        out = np.empty_like(w)
        for j in range(0, w.shape[1], g):
            blk = w[:, j:j + g]
            s = np.maximum(np.abs(blk).max(1, keepdims=True), eps) / 7
            out[:, j:j + g] = np.clip(np.round(blk / s), -7, 7) * s
        return out
    gam = np.abs(w).mean(1, keepdims=True) if cfg.scale == "channel" else np.abs(w).mean()
    if cfg.weight == "binary":
        return np.where(w >= 0, 1.0, -1.0) * gam
    return np.clip(np.round(w / (gam + eps)), -1, 1) * gam


def _ref_act(x: np.ndarray) -> np.ndarray:
    s = 127 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    return np.round(x * s) / s


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: c.kind)
def test_forward_matches_float64_and_ste_backward(cfg):
    torch.manual_seed(0)
    m = BitLinear(150, 37, config=cfg).double()
    x = torch.randn(2, 5, 150, dtype=torch.float64, requires_grad=True)
    y = m(x)
    wd = _ref_weight(m.weight.detach().numpy(), cfg)
    ref = _ref_act(x.detach().numpy()) @ wd.T
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    # straight-through: grad_x = g @ deq(W), grad_W = g^T @ deq(x)
    g2 = g.reshape(-1, 37).numpy()
    np.testing.assert_allclose(x.grad.reshape(-1, 150).numpy(), g2 @ wd, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.weight.grad.numpy(), g2.T @ _ref_act(x.detach().reshape(-1, 150).numpy()),
                               rtol=1e-10, atol=1e-12)
    q, s = m.quantized_weight()
    assert q.dtype == torch.int8 and q.shape == (37, 150)
    want_s = {"int8": (37, 1), "int4": (37, -(-150 // cfg.group_size))}.get(
        cfg.weight, (37, 1) if cfg.scale == "channel" else ())
    assert tuple(s.shape) == want_s


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: c.kind)
def test_lambda_and_annealing_paths_run(cfg):
    m = BitLinear(64, 16, config=cfg)
    x = torch.randn(3, 64, requires_grad=True)
    m.lam = 0.5
    m(x).sum().backward()
    m.lam, m.anneal_alpha = 1.0, 4.0
    m(x).sum().backward()
    assert torch.isfinite(m.weight.grad).all()


def _mixed_cfg():
    base = ModelConfig(vocab_size=50, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=32)
    ov = quant_overrides_from({"layers.0.*": "int8", "*.down_proj": {"weight": "int4", "group_size": 32},
                               "layers.1.self_attn.[qk]_proj": {"weight": "binary", "scale": "channel"},
                               "layers.1.self_attn.o_proj": "fp"}, base.quant)
    return base.replace(quant_overrides=ov)


def test_per_layer_spec_builds_each_kind_first_match_wins():
    cfg = _mixed_cfg()
    model = Transformer(cfg)
    kinds = {n: (m.config.kind if isinstance(m, BitLinear) else "nn.Linear")
             for n, m in model.named_modules() if n in set(cfg.linear_names())}
    assert kinds["layers.0.mlp.down_proj"] == "int8"  # layers.0.* comes first
    assert kinds["layers.0.self_attn.q_proj"] == "int8"
    assert kinds["layers.1.mlp.down_proj"] == "int4-g32"
    assert kinds["layers.1.self_attn.q_proj"] == "binary-ch"
    assert kinds["layers.1.self_attn.k_proj"] == "binary-ch"
    assert kinds["layers.1.self_attn.v_proj"] == "ternary"
    assert kinds["layers.1.self_attn.o_proj"] == "nn.Linear"  # "fp" = a plain Linear
    assert cfg.uniform_quant is None and cfg.quantised
    # overrides keep the default's other fields (act_bits)
    assert cfg.quant_for("layers.1.mlp.down_proj").act_bits == 8
    assert cfg.fp_twin().quant_overrides == () and not cfg.fp_twin().quantised


def test_per_layer_spec_round_trips_through_json():
    cfg = _mixed_cfg()
    d = json.loads(json.dumps(cfg.to_dict()))
    assert list(d["quant_overrides"])[0] == "layers.0.*"  # order kept
    back = ModelConfig.from_dict(d)
    assert back == cfg
    assert back.layer_quants() == cfg.layer_quants()
    # a reloaded model reproduces the original's outputs
    torch.manual_seed(1)
    a = Transformer(cfg).eval()
    b = Transformer(back).eval()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 50, (2, 9))
    assert torch.equal(a(idx)[0], b(idx)[0])


@pytest.mark.parametrize("bad", [{"x.*": {"weight": "int3"}}, {"x.*": {"colour": 1}}, {"": "int8"},
                                 {"x": {"weight": "int4", "group_size": 48}}, ["not-a-pair"], 5])
def test_bad_overrides_are_config_errors(bad):
    from tritlm.errors import ConfigError

    with pytest.raises(ConfigError):
        ModelConfig.from_dict({"quant_overrides": bad})


def test_activation_slot_is_per_module_group(monkeypatch):
    """q/k/v (and gate/up) quantise their shared input once; the cache is module state, so two
    models never share or evict each other's entries."""
    import tritlm.nn.bitlinear as bl

    calls = []
    real = bl._dequant_act
    monkeypatch.setattr(bl, "_dequant_act", lambda x, b, e: calls.append(x.shape) or real(x, b, e))
    cfg = ModelConfig(vocab_size=50, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=32)
    a, b = Transformer(cfg), Transformer(cfg)
    at = a.layers[0].self_attn
    assert at.q_proj.act_slot is at.k_proj.act_slot is at.v_proj.act_slot
    assert at.o_proj.act_slot is not at.q_proj.act_slot
    assert a.layers[0].mlp.gate_proj.act_slot is a.layers[0].mlp.up_proj.act_slot
    assert b.layers[0].self_attn.q_proj.act_slot is not at.q_proj.act_slot
    idx = torch.randint(0, 50, (2, 8))
    a(idx, idx)[1].backward()
    # per layer: q|k|v input, o input, gate|up input, down input -> 4 quantisations, not 7
    assert len(calls) == 4 * cfg.n_layers
