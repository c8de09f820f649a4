"""BitLinear against a float64 numpy reference (forward) and the naive autograd STE form (gradients)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tritlm.nn import BitLinear
from tritlm.quant import FP, QuantConfig, absmax_int8, quantize_weight, soft_binary, soft_ternary

EPS = 1e-5
CONFIGS = {
    "ternary": QuantConfig(),
    "binary": QuantConfig(weight="binary"),
    "twn": QuantConfig(dynamic_threshold=0.7),
    "a4": QuantConfig(act_bits=4),
    "w-only": QuantConfig(act_bits=None),
    "a8-only": QuantConfig(weight="fp"),
    "norm-ste2": QuantConfig(input_norm=True, ste_scale=2.0),
}


# ---- data that keeps away from rounding ties, so float32 and float64 agree on every level ----------
def _tie_free_x(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    s = 127 / x.abs().amax(-1, keepdim=True)
    v = x * s
    bad = ((v - v.floor()) - 0.5).abs() < 0.1
    return torch.where(bad, (v.floor() + 0.25) / s, x).float()


def _tie_free_w(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * 0.02
    for _ in range(20):
        gamma = w.abs().mean() + EPS
        u = w / gamma
        bad = (u.abs() - 0.5).abs() < 0.05
        if not bad.any():
            break
        w = torch.where(bad, torch.sign(w) * 0.3 * gamma, w)
    # TWN threshold 0.7 * mean|W|: keep away from it as well
    a = w.abs()
    bad = (a - 0.7 * a.mean()).abs() < 0.02 * a.mean()
    w = torch.where(bad, w * 1.1, w)
    return w.float()


def _module(cfg, in_f, out_f, bias, seed=0):
    m = BitLinear(in_f, out_f, bias=bias, config=cfg)
    with torch.no_grad():
        m.weight.copy_(_tie_free_w(out_f, in_f, seed))
        if bias:
            m.bias.copy_(torch.linspace(-0.1, 0.1, out_f))
    return m


# ---- independent references --------------------------------------------------------------------
def ref_forward(m: BitLinear, x: torch.Tensor) -> np.ndarray:
    """Float64 numpy, written from the definitions."""
    cfg = m.config
    xs = x.detach().numpy().astype(np.float64).reshape(-1, x.shape[-1])
    w = m.weight.detach().numpy().astype(np.float64)
    if cfg.input_norm:
        xs = xs / np.sqrt((xs * xs).mean(-1, keepdims=True) + 1e-6)
    xd = xs
    if cfg.act_bits is not None:
        qp, qn = 2 ** (cfg.act_bits - 1) - 1, 2 ** (cfg.act_bits - 1)
        s = qp / np.maximum(np.abs(xs).max(-1, keepdims=True), cfg.eps)
        xd = np.clip(np.round(xs * s), -qn, qp) / s
    a = np.abs(w)
    if cfg.weight == "fp":
        wd = w
    elif cfg.weight == "binary":
        wd = np.where(w >= 0, 1.0, -1.0) * a.mean()
    elif cfg.dynamic_threshold is not None:
        keep = a > cfg.dynamic_threshold * a.mean()
        wd = np.sign(w) * keep * a[keep].mean()
    else:
        wd = np.clip(np.round(w / (a.mean() + cfg.eps)), -1, 1) * a.mean()
    y = xd @ wd.T
    if m.bias is not None:
        y = y + m.bias.detach().numpy().astype(np.float64)
    if m.residual_coef:
        y = y + m.residual_coef * xs @ w.T
    return y.reshape(*x.shape[:-1], -1)


def naive_forward(m: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """The BitNet-FAQ autograd form: x + (q(x) - x).detach(), W*k + (q(W) - W*k).detach()."""
    cfg, w = m.config, m.weight
    h = F.rms_norm(x, (x.shape[-1],), eps=1e-6) if cfg.input_norm else x
    hq = h
    if cfg.act_bits is not None:
        q, s = absmax_int8(h.detach(), cfg.act_bits, cfg.eps)
        hq = h + (q / s - h).detach()
    wq = w
    if cfg.quantised:
        q, scale = quantize_weight(w.detach(), cfg)
        wq = w * cfg.ste_scale + (q * scale - w * cfg.ste_scale).detach()
    y = F.linear(hq, wq, m.bias)
    if m.residual_coef:
        y = y + m.residual_coef * F.linear(h, w)
    return y


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-30))


def _grads(m, x, fn, g):
    x = x.clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = fn(m, x)
    y.backward(g)
    out = [y.detach(), x.grad, m.weight.grad] + ([m.bias.grad] if m.bias is not None else [])
    return out


# ---- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(24, 40), (3, 5, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_grads_match_references(name, shape, bias):
    cfg = CONFIGS[name]
    m = _module(cfg, 40, 24, bias, seed=len(shape))
    x = _tie_free_x(shape, seed=7)
    g = torch.randn(*shape[:-1], 24, generator=torch.Generator().manual_seed(1))
    y, gx, gw, *gb = _grads(m, x, lambda mod, t: mod(t), g)
    _close(y.numpy(), ref_forward(m, x))
    ny, ngx, ngw, *ngb = _grads(m, x, naive_forward, g)
    _close(y, ny)
    _close(gx, ngx)
    _close(gw, ngw)
    if bias:
        _close(gb[0], ngb[0])
    with torch.no_grad():  # the inference path computes the same thing
        assert torch.equal(m(x), y)


def test_residual_coef_and_ste_scale():
    m = _module(QuantConfig(ste_scale=0.5), 32, 16, bias=True, seed=3)
    m.residual_coef = 0.3
    x = _tie_free_x((2, 6, 32), seed=2)
    g = torch.randn(2, 6, 16)
    y, gx, gw, gb = _grads(m, x, lambda mod, t: mod(t), g)
    _close(y.numpy(), ref_forward(m, x))
    ny, ngx, ngw, ngb = _grads(m, x, naive_forward, g)
    for a, b in [(y, ny), (gx, ngx), (gw, ngw), (gb, ngb)]:
        _close(a, b)
    # the residual branch puts a real (non-STE) gradient on W: 0.5 * STE + 0.3 * dense
    m.residual_coef = 0.0
    _, _, gw0, _ = _grads(m, x, lambda mod, t: mod(t), g)
    dense = g.reshape(-1, 16).t() @ x.reshape(-1, 32)
    _close(gw, gw0 + 0.3 * dense)


def test_fp_mode_is_exactly_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12, bias=True)
    m = BitLinear(20, 12, bias=True, config=FP)
    m.load_state_dict(lin.state_dict())
    x = torch.randn(4, 3, 20)
    g = torch.randn(4, 3, 12)
    ya, gxa, gwa, gba = _grads(lin, x, lambda mod, t: mod(t), g)
    yb, gxb, gwb, gbb = _grads(m, x, lambda mod, t: mod(t), g)
    for a, b in [(ya, yb), (gxa, gxb), (gwa, gwb), (gba, gbb)]:
        assert torch.equal(a, b)


def test_lambda_mixing():
    m = _module(QuantConfig(), 32, 16, bias=True, seed=4)
    x = _tie_free_x((10, 32), seed=4)
    hard = m(x).detach()
    m.lam = 0.0
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))  # exact full precision
    m.lam = 1.0
    assert torch.equal(m(x), hard)
    # the composable path at lam = 1 agrees with the fused Function
    _close(F.linear(m._act(x), m._weight(), m.bias).detach(), hard)
    m.lam = 0.4
    xq, s = absmax_int8(x)
    q, sc = quantize_weight(m.weight.detach(), m.config)
    xm = x + 0.4 * (xq / s - x)
    wm = m.weight + 0.4 * (q * sc - m.weight)
    _close(m(x).detach(), F.linear(xm, wm, m.bias).detach())
    # and its gradient w.r.t. W is (1 - lam) dense + lam STE = the dense form of F.linear(xm, .)
    xr = x.clone().requires_grad_()
    m.zero_grad()
    m(xr).sum().backward()
    _close(m.weight.grad, torch.ones(10, 16).t() @ xm.detach())
    _close(xr.grad, torch.ones(10, 16) @ wm.detach())


@pytest.mark.parametrize("weight", ["ternary", "binary"])
def test_anneal_soft_path(weight):
    cfg = QuantConfig(weight=weight, act_bits=None)
    m = _module(cfg, 48, 20, bias=False, seed=5)
    if weight == "binary":  # keep |W| away from the binary step at 0
        with torch.no_grad():
            m.weight.add_(torch.where(m.weight >= 0, 0.002, -0.002))
    x = _tie_free_x((6, 48), seed=5)
    hard = m(x).detach()
    m.anneal_alpha = 2000.0  # far from the steps, tanh(2000 * 0.05) == 1 in float32
    _close(m(x).detach(), hard, rtol=1e-5)
    m.anneal_alpha = 1.0
    soft = m(x).detach()
    assert (soft - hard).abs().max() > 1e-2 * hard.abs().max()
    # gradient is the true derivative of soft(W / gamma) * gamma with the scale held constant
    m.anneal_alpha = 2.5
    m.zero_grad()
    m(x).sum().backward()
    w = m.weight.detach().clone().requires_grad_()
    gamma = w.detach().abs().mean()
    fn = soft_binary if weight == "binary" else soft_ternary
    inv = 1.0 / (gamma + EPS)
    F.linear(x, fn(w * inv, 2.5) * gamma).sum().backward()
    _close(m.weight.grad, w.grad)
    assert not torch.allclose(m.weight.grad, torch.ones(6, 20).t() @ x)  # not the STE gradient


def test_bf16_autocast():
    m = _module(QuantConfig(), 64, 32, bias=True, seed=6)
    x = _tie_free_x((2, 8, 64), seed=6)
    g = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, gx, gw, gb = _grads(m, x, lambda mod, t: mod(t), g)
        ny, ngx, ngw, ngb = _grads(m, x, naive_forward, g)
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.float32 and gw.dtype == torch.float32
    for a, b in [(y, ny), (gx, ngx), (gw, ngw), (gb, ngb)]:
        _close(a.float(), b.float(), rtol=2e-2)
    _close(y.float().numpy(), ref_forward(m, x), rtol=2e-2)
    # bf16 parameters and inputs without autocast work too
    mb = _module(QuantConfig(), 64, 32, bias=False, seed=6).bfloat16()
    assert mb(x.bfloat16()).dtype == torch.bfloat16


def test_shared_input_quantised_once_and_invalidated_by_in_place_change():
    ms = [_module(QuantConfig(), 32, 8, bias=False, seed=s) for s in range(3)]
    x = _tie_free_x((5, 32), seed=8)
    ys = [m(x) for m in ms]  # the second and third reuse the first quantisation
    for m, y in zip(ms, ys):
        _close(y.detach().numpy(), ref_forward(m, x))
    x.mul_(-2.0)  # bumps the version: the cached quantisation must not be reused
    _close(ms[0](x).detach().numpy(), ref_forward(ms[0], x))
    # different act bits on the same tensor: a separate quantisation
    m4 = _module(QuantConfig(act_bits=4), 32, 8, bias=False, seed=0)
    _close(m4(x).detach().numpy(), ref_forward(m4, x))
    # gradients through three modules sharing one quantised input all reach x
    xr = x.clone().requires_grad_()
    sum(m(xr).sum() for m in ms).backward()
    expect = sum(torch.ones(5, 8) @ quantize_weight(m.weight.detach(), m.config)[0]
                 * quantize_weight(m.weight.detach(), m.config)[1] for m in ms)
    _close(xr.grad, expect)


def test_inference_mode_1d_and_non_contiguous_inputs():
    m = _module(QuantConfig(), 32, 8, bias=True, seed=9)
    x = _tie_free_x((4, 6, 32), seed=9)
    ref = ref_forward(m, x)
    with torch.inference_mode():  # inference tensors have no version counter
        xi = x.clone()
        _close(m(xi).numpy(), ref)
        _close(m(xi).numpy(), ref)
    xt = x.transpose(0, 1)  # non-contiguous 3-D input
    _close(m(xt).detach().numpy(), ref.transpose(1, 0, 2))
    y1 = m(x[1, 2].clone().requires_grad_())  # a single token, 1-D
    assert y1.shape == (8,)
    _close(y1.detach().numpy(), ref[1, 2])


def test_quantized_weight_clamp_and_repr():
    m = _module(QuantConfig(latent_clamp=0.01), 16, 8, bias=False)
    q, s = m.quantized_weight()
    assert q.dtype == torch.int8 and q.shape == (8, 16) and set(q.unique().tolist()) <= {-1, 0, 1}
    assert s.dtype == torch.float32 and s.shape == ()
    w = m.weight.detach().double().numpy()
    np.testing.assert_array_equal(q.numpy(), np.clip(np.round(w / (np.abs(w).mean() + EPS)), -1, 1))
    assert float(s) == pytest.approx(np.abs(w).mean(), rel=1e-6)
    m.clamp_latent_()
    assert m.weight.abs().max() <= 0.01 and m.weight.abs().max() == 0.01
    qb, _ = BitLinear(16, 8, config=QuantConfig(weight="binary")).quantized_weight()
    assert set(qb.unique().tolist()) == {-1, 1}
    with pytest.raises(ValueError):
        BitLinear(4, 4, config=FP).quantized_weight()
    m2 = BitLinear(4, 4, config=QuantConfig())
    before = m2.weight.detach().clone()
    m2.clamp_latent_()  # no clamp configured: untouched
    assert torch.equal(m2.weight, before)
    assert "weight=ternary" in repr(m) and "latent_clamp=0.01" in repr(m)
    assert set(m.state_dict()) == {"weight"}  # runtime schedule state is not saved
    assert set(BitLinear(4, 4, config=QuantConfig(input_norm=True)).state_dict()) == {"weight"}
