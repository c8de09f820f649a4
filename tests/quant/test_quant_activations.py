"""Per-token absmax activation quantisation against a float64 numpy reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tritlm.quant import absmax_int8

SHAPES = [(1, 1), (3, 7), (5, 13, 17), (2, 255)]
EPS = 1e-5


def ref_absmax(x: np.ndarray, bits: int, eps: float):
    x = x.astype(np.float64)
    qp, qn = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    s = qp / np.maximum(np.abs(x).max(axis=-1, keepdims=True), eps)
    v = x * s
    return np.clip(np.round(v), -qn, qp), s, v


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_absmax_matches_reference(shape, bits):
    x = _x(shape, seed=bits + shape[-1])
    q, s = absmax_int8(x, bits=bits, eps=EPS)
    q_ref, s_ref, v = ref_absmax(x.numpy(), bits, EPS)
    assert q.dtype == x.dtype and q.shape == x.shape and s.shape == (*shape[:-1], 1)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-6)
    frac = np.abs(v) - np.floor(np.abs(v))
    ok = np.abs(frac - 0.5) > 1e-4  # float32 and float64 may round a near-tie differently
    np.testing.assert_array_equal(q.numpy()[ok], q_ref[ok])
    qp = 2 ** (bits - 1) - 1
    assert q.min() >= -qp - 1 and q.max() <= qp
    # the largest |x| of each token maps to exactly +-Qp
    assert torch.equal(q.abs().amax(-1), torch.full(shape[:-1], float(qp)))
    # dequantisation error is at most half a step per entry
    assert ((q / s - x).abs() <= 0.5 / s * (1 + 1e-5)).all()


def test_absmax_all_zero_and_tiny_tokens():
    x = torch.zeros(3, 8)
    x[1] = 1e-9  # below eps: the scale is clamped, no overflow, no NaN
    x[2] = torch.linspace(-1, 1, 8)
    q, s = absmax_int8(x, eps=EPS)
    assert torch.isfinite(q).all() and torch.isfinite(s).all()
    assert torch.equal(q[0], torch.zeros(8)) and torch.equal(q[1], torch.zeros(8))
    assert float(s[0]) == pytest.approx(127 / EPS)
    assert q[2, 0] == -127 and q[2, -1] == 127


def test_absmax_as_int8_and_low_precision():
    x = _x((4, 33), seed=1)
    q, _s = absmax_int8(x, as_int=True)
    assert q.dtype == torch.int8
    qf, _ = absmax_int8(x)
    assert torch.equal(q.float(), qf)
    with pytest.raises(ValueError):
        absmax_int8(x, bits=16, as_int=True)
    with pytest.raises(ValueError):
        absmax_int8(x, bits=1)
    # bf16 input: quantised in float32, so the levels equal those of the float32 copy
    xb = x.bfloat16()
    qb, sb = absmax_int8(xb)
    q32, s32 = absmax_int8(xb.float())
    assert qb.dtype == torch.bfloat16 and sb.dtype == torch.float32
    assert torch.equal(qb.float(), q32) and torch.equal(sb, s32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 40)),
              elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
def test_absmax_range_property(a):
    """Whatever the magnitudes, levels stay within [-Qn, Qp] and are integers."""
    q, _s = absmax_int8(torch.from_numpy(a))
    assert torch.isfinite(q).all()
    assert q.min() >= -128 and q.max() <= 127
    assert torch.equal(q, q.round())
