"""int8 / int4 / per-channel quantisers against float64 numpy references written from the definitions."""

import numpy as np
import pytest
import torch

from tritlm.quant import (
    QuantConfig,
    absmax_int4,
    absmax_int8_weight,
    absmean_ternary,
    dequantize,
    quantize_weight,
    sign_binary,
    threshold_ternary,
)

EPS = 1e-5
SHAPES = [(1, 1), (3, 7), (5, 33), (17, 100), (64, 257)]


def _w(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.02
    w[0, 0] = 0.0  # exact zeros must round-trip
    return w


def ref_int8(w):
    s = np.maximum(np.abs(w).max(axis=1, keepdims=True), EPS) / 127.0
    return np.clip(np.round(w / s), -127, 127), s


def ref_int4(w, g):
    n, k = w.shape
    ng = -(-k // g)
    q = np.zeros_like(w)
    s = np.zeros((n, ng))
    for r in range(n):
        for j in range(ng):
            blk = w[r, j * g:(j + 1) * g]
            s[r, j] = max(np.abs(blk).max(), EPS) / 7.0
            q[r, j * g:(j + 1) * g] = np.clip(np.round(blk / s[r, j]), -7, 7)
    return q, s


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_per_channel_matches_float64(shape):
    w = _w(shape, 1)
    q, s = absmax_int8_weight(w, EPS)
    rq, rs = ref_int8(w.numpy())
    assert s.shape == (shape[0], 1)
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_allclose(s.numpy(), rs, rtol=1e-15)
    nonzero = w.abs().amax(dim=1) > 0
    assert q.abs().max() <= 127 and (q.abs() == 127).any(dim=1)[nonzero].all()  # rows reach +-127
    # error bound: half a step per entry
    assert (dequantize(q, s) - w).abs().le(s / 2 + 1e-18).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_per_group_matches_float64(shape, g):
    w = _w(shape, 2)
    q, s = absmax_int4(w, g, EPS)
    rq, rs = ref_int4(w.numpy(), g)
    assert q.shape == w.shape and s.shape == (shape[0], -(-shape[1] // g))
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_allclose(s.numpy(), rs, rtol=1e-15)
    deq = dequantize(q, s, g).numpy()
    ref = rq * np.repeat(rs, g, axis=1)[:, :shape[1]]
    np.testing.assert_allclose(deq, ref, rtol=1e-15, atol=0)


def test_int4_float32_close_to_float64():
    w = _w((9, 130), 3)
    q32, s32 = absmax_int4(w.float(), 64, EPS)
    q64, _ = absmax_int4(w, 64, EPS)
    # float32 may flip a level only where float64 sits on a rounding boundary
    assert (q32.double() - q64).abs().max() <= 1
    assert (q32.double() != q64).float().mean() < 0.01
    assert s32.dtype == torch.float32


@pytest.mark.parametrize("shape", SHAPES)
def test_per_channel_ternary_and_binary(shape):
    w = _w(shape, 4)
    a = np.abs(w.numpy())
    gam = a.mean(axis=1, keepdims=True)
    q, s = absmean_ternary(w, EPS, per_channel=True)
    np.testing.assert_array_equal(q.numpy(), np.clip(np.round(w.numpy() / (gam + EPS)), -1, 1))
    np.testing.assert_allclose(s.numpy(), gam, rtol=1e-14)
    qb, sb = sign_binary(w, EPS, per_channel=True)
    np.testing.assert_array_equal(qb.numpy(), np.where(w.numpy() >= 0, 1.0, -1.0))
    np.testing.assert_allclose(sb.numpy(), gam, rtol=1e-14)
    qt, st = threshold_ternary(w, 0.7, EPS, per_channel=True)
    keep = a > 0.7 * gam
    np.testing.assert_array_equal(qt.numpy(), np.sign(w.numpy()) * keep)
    n = keep.sum(axis=1, keepdims=True)
    want = np.where(n > 0, (a * keep).sum(axis=1, keepdims=True) / np.maximum(n, 1), EPS)
    np.testing.assert_allclose(st.numpy(), want, rtol=1e-14)


def test_dispatch_per_kind():
    w = _w((6, 70), 5)
    for cfg, fn in [(QuantConfig(weight="int8"), lambda: absmax_int8_weight(w, EPS)),
                    (QuantConfig(weight="int4", group_size=32), lambda: absmax_int4(w, 32, EPS)),
                    (QuantConfig(scale="channel"), lambda: absmean_ternary(w, EPS, True)),
                    (QuantConfig(weight="binary", scale="channel"), lambda: sign_binary(w, EPS, True))]:
        q, s = quantize_weight(w, cfg)
        q2, s2 = fn()
        assert torch.equal(q, q2) and torch.equal(s, s2), cfg.kind
    # per-tensor stays 0-dim (what every existing format expects)
    assert quantize_weight(w, QuantConfig())[1].dim() == 0
