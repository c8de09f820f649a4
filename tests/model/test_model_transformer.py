"""The transformer against a naive float64 reference written from the equations, and KV-cache checks."""

import math

import pytest
import torch

from tritlm.errors import ConfigError
from tritlm.model.config import ModelConfig, preset
from tritlm.model.sizes import model_sizes
from tritlm.model.transformer import Transformer
from tritlm.quant.config import FP

SHAPES = [
    dict(),
    dict(n_kv_heads=2, qk_norm=True),
    dict(mlp="relu2", sub_norm=True, tie_embeddings=True, residual_scale=0.7),
]


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=37, dim=48, n_layers=2, n_heads=4, ffn_dim=72, max_seq_len=32, quant=FP)
    base.update(kw)
    return ModelConfig(**base)


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope_complex(x, theta):
    """RoPE on the (i, i + d/2) pairs as complex rotations: an independent formulation."""
    b, h, t, d = x.shape
    half = d // 2
    z = torch.complex(x[..., :half], x[..., half:])
    inv = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) * 2 / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    z = z * torch.polar(torch.ones_like(ang), ang)
    return torch.cat([z.real, z.imag], -1)


def naive_forward(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    c = model.cfg
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = sd["embed_tokens.weight"][idx]
    t = idx.shape[1]
    hd = c.head_dim
    mask = torch.full((t, t), -math.inf, dtype=torch.float64).triu(1)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], c.norm_eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(1, t, c.n_heads, hd).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(1, t, c.kv_heads, hd).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(1, t, c.kv_heads, hd).transpose(1, 2)
        if c.qk_norm:
            q = _rms(q, sd[p + "self_attn.q_norm.weight"], c.norm_eps)
            k = _rms(k, sd[p + "self_attn.k_norm.weight"], c.norm_eps)
        q, k = _rope_complex(q, c.rope_theta), _rope_complex(k, c.rope_theta)
        outs = []
        for head in range(c.n_heads):
            kv = head // (c.n_heads // c.kv_heads)
            s = q[:, head] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd) + mask
            outs.append(torch.softmax(s, -1) @ v[:, kv])
        a = torch.cat(outs, -1)
        if c.sub_norm:
            a = _rms(a, sd[p + "self_attn.attn_sub_norm.weight"], c.norm_eps)
        x = x + c.residual_scale * (a @ sd[p + "self_attn.o_proj.weight"].T)
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], c.norm_eps)
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        g = g * torch.sigmoid(g) if c.mlp == "swiglu" else torch.relu(g) ** 2
        m = g * (h @ sd[p + "mlp.up_proj.weight"].T)
        if c.sub_norm:
            m = _rms(m, sd[p + "mlp.ffn_sub_norm.weight"], c.norm_eps)
        x = x + c.residual_scale * (m @ sd[p + "mlp.down_proj.weight"].T)
    x = _rms(x, sd["norm.weight"], c.norm_eps)
    head = sd["embed_tokens.weight"] if c.tie_embeddings else sd["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("kw", SHAPES)
def test_forward_matches_float64_reference(kw):
    torch.manual_seed(0)
    m = Transformer(_cfg(**kw)).eval()
    for p in m.parameters():  # norms away from 1 so that their weights matter
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    idx = torch.randint(0, 37, (1, 19))
    got, _ = m(idx)
    ref = naive_forward(m, idx)
    assert torch.allclose(got[0].double(), ref[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", SHAPES)
def test_kv_cache_matches_full_forward(kw):
    torch.manual_seed(1)
    m = Transformer(_cfg(**kw)).eval()
    idx = torch.randint(0, 37, (3, 23))
    full, _ = m(idx)
    cache = m.new_cache(3)
    parts = [m(idx[:, a:b], cache=cache)[0] for a, b in [(0, 9), (9, 10), (10, 17), (17, 23)]]
    assert cache.pos == 23
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_loss_is_cross_entropy_of_logits():
    torch.manual_seed(2)
    m = Transformer(_cfg())
    idx = torch.randint(0, 37, (2, 11))
    tgt = torch.randint(0, 37, (2, 11))
    logits, loss = m(idx, tgt)
    lp = torch.log_softmax(logits.double(), -1)
    ref = -lp.gather(-1, tgt[..., None]).mean()
    assert abs(loss.item() - ref.item()) < 1e-5


@pytest.mark.parametrize("name", ["tiny", "125M", "700M", "bitnet-2b4t"])
def test_param_count_matches_analytic(name):
    cfg = preset(name)
    with torch.device("meta"):
        m = Transformer(cfg.fp_twin())
    assert m.num_params() == model_sizes(cfg).params


def test_presets_have_documented_shapes():
    p = preset("700M")
    assert (p.dim, p.n_layers, p.n_heads, p.ffn_dim) == (1536, 24, 16, 4096)
    b = preset("bitnet-2b4t")
    assert (b.dim, b.n_layers, b.n_heads, b.kv_heads, b.ffn_dim, b.mlp, b.rope_theta) == (
        2560, 30, 20, 5, 6912, "relu2", 500000.0)
    assert b.sub_norm and b.tie_embeddings
    assert preset("tiny").fp_twin().quant.weight == "fp"


@pytest.mark.parametrize("kw,msg", [(dict(dim=50, n_heads=4), "divisible"),
                                    (dict(n_kv_heads=3), "multiple"),
                                    (dict(mlp="gelu"), "mlp")])
def test_bad_config_is_a_clear_error(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(**kw)
    with pytest.raises(ConfigError, match="unknown model config key"):
        ModelConfig.from_dict({"dimm": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("9B")
