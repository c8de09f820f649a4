"""Weight quantisers against independent float64 numpy references written from the definitions."""

import numpy as np
import pytest
import torch

from tritlm.quant import (
    BINARY,
    FP,
    TERNARY,
    QuantConfig,
    absmean_ternary,
    quantize_weight,
    sign_binary,
    threshold_ternary,
)

SHAPES = [(1, 1), (3, 7), (5, 13, 17), (2, 255), (64, 48)]
EPS = 1e-5


def _w(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def ref_absmean(w: np.ndarray, eps: float):
    w = w.astype(np.float64)
    g = np.abs(w).mean()
    u = w / (g + eps)
    return np.clip(np.round(u), -1, 1), g, u


def ref_threshold(w: np.ndarray, t: float, eps: float):
    w = w.astype(np.float64)
    a = np.abs(w)
    delta = t * a.mean()
    keep = a > delta
    q = np.sign(w) * keep
    scale = a[keep].mean() if keep.any() else eps
    return q, scale, a, delta


def _near(u: np.ndarray, edges, tol: float) -> np.ndarray:
    """Entries whose float32 and float64 evaluations may legitimately round differently."""
    return np.logical_or.reduce([np.abs(np.abs(u) - e) < tol for e in edges])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_absmean_ternary_matches_reference(shape, dtype):
    w = _w(shape, seed=len(shape) + shape[-1], dtype=dtype)
    q, scale = absmean_ternary(w, EPS)
    q_ref, g_ref, u = ref_absmean(w.numpy(), EPS)
    assert q.dtype == w.dtype and q.shape == w.shape and scale.shape == ()
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert float(scale) == pytest.approx(g_ref, rel=1e-6)
    ok = ~_near(u, [0.5], 1e-5)
    np.testing.assert_array_equal(q.numpy()[ok], q_ref[ok])
    assert ok.mean() > 0.99


def test_absmean_ternary_ties_round_half_to_even():
    # gamma = mean|w| = 1 and eps = 0: w / gamma hits exactly +-0.5 and +-1.5.
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5], [0.25, -0.75, 2.0, 1.0]])
    w = w / w.abs().mean()
    q, g = absmean_ternary(w, eps=0.0)
    q_ref, _g_ref, _ = ref_absmean(w.numpy(), 0.0)  # np.round is half-to-even too
    np.testing.assert_array_equal(q.numpy(), q_ref)
    u = (w / g).numpy()
    assert np.any(np.abs(u) == 0.5)
    assert (q.numpy()[np.abs(u) == 0.5] == 0).all()


def test_absmean_ternary_all_zero_and_dequant():
    q, g = absmean_ternary(torch.zeros(4, 5), EPS)
    assert torch.equal(q, torch.zeros(4, 5)) and float(g) == 0.0
    w = _w((32, 40), seed=3)
    q, g = absmean_ternary(w, EPS)
    # Each kept weight lands within half a step (0.5 * gamma) unless it was clipped at +-gamma.
    err = (q * g - w).abs()
    inside = w.abs() <= 1.5 * g
    assert (err[inside] <= 0.5 * g * (1 + 1e-5) + EPS).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.5, 0.7, 1.2])
def test_threshold_ternary_matches_reference(shape, t):
    w = _w(shape, seed=7 + shape[0])
    q, scale = threshold_ternary(w, t, EPS)
    q_ref, s_ref, a, delta = ref_threshold(w.numpy(), t, EPS)
    assert q.dtype == w.dtype and set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}
    ok = np.abs(a - delta) > 1e-6 * max(delta, 1e-12)
    np.testing.assert_array_equal(q.numpy()[ok], q_ref[ok])
    if ok.all():
        assert float(scale) == pytest.approx(s_ref, rel=1e-5)


def test_threshold_ternary_nothing_kept_and_all_zero():
    q, s = threshold_ternary(torch.zeros(3, 3), 0.7, EPS)
    assert torch.equal(q, torch.zeros(3, 3)) and float(s) == pytest.approx(EPS)
    # All |w| equal (and exactly representable): none is strictly above t * mean|w| for t >= 1.
    q, s = threshold_ternary(torch.full((2, 6), -0.25), 1.0, EPS)
    assert torch.equal(q, torch.zeros(2, 6)) and float(s) == pytest.approx(EPS)
    q, s = threshold_ternary(torch.full((2, 6), -0.25), 0.5, EPS)
    assert torch.equal(q, -torch.ones(2, 6)) and float(s) == 0.25


@pytest.mark.parametrize("shape", SHAPES)
def test_sign_binary_matches_reference(shape):
    w = _w(shape, seed=11)
    w.view(-1)[0] = 0.0  # zero maps to +1
    q, scale = sign_binary(w, EPS)
    wn = w.numpy().astype(np.float64)
    np.testing.assert_array_equal(q.numpy(), np.where(wn >= 0, 1.0, -1.0))
    assert set(q.unique().tolist()) <= {-1.0, 1.0}
    assert float(scale) == pytest.approx(np.abs(wn).mean(), rel=1e-6)
    q, scale = sign_binary(torch.zeros(2, 3), EPS)
    assert torch.equal(q, torch.ones(2, 3)) and float(scale) == 0.0


def test_quantize_weight_dispatch():
    w = _w((16, 24), seed=5)
    for cfg, fn in [(TERNARY, lambda: absmean_ternary(w, EPS)),
                    (BINARY, lambda: sign_binary(w, EPS)),
                    (QuantConfig(dynamic_threshold=0.7), lambda: threshold_ternary(w, 0.7, EPS))]:
        q, s = quantize_weight(w, cfg)
        q2, s2 = fn()
        assert torch.equal(q, q2) and torch.equal(s, s2)
    q, s = quantize_weight(w, FP)
    assert torch.equal(q, w) and float(s) == 1.0
    with pytest.raises(ValueError):
        QuantConfig(weight="int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        QuantConfig(weight="int4", group_size=48)
