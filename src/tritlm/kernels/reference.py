"""Plain numpy references for the CPU kernels: slow, obvious, exact.

* :func:`quantize_act_ref` - per-token absmax int8 activation quantisation (BitNet b1.58):
  ``amax = max(max|x|, 1e-5)``, ``s = 127 / amax`` (float32), ``q = clamp(rint(x * s), -128, 127)``
  with the product and the division done in float32 and round-half-to-even, exactly as the C
  quantiser does (so the two agree bit for bit). The ``1e-5`` floor (as in BitNet's reference code)
  only matters for an all-zero row, which quantises to zeros with a finite scale.
* :func:`ternary_matmul_int_ref` - the integer dot products ``xq @ wq^T`` in int64.
* :func:`ternary_matmul_ref` - ``(xq @ wq^T) * w_scale / x_scale[:, None]`` in float64, returned as
  float32. ``w_scale`` is a scalar (per tensor, BitNet) or a length-N vector (per output row);
  it multiplies (W ~= wq * w_scale).
"""

from __future__ import annotations

import numpy as np

__all__ = ["ACT_EPS", "quantize_act_ref", "ternary_matmul_int_ref", "ternary_matmul_ref"]

ACT_EPS = np.float32(1e-5)


def _np(a):
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def quantize_act_ref(x) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``[M, K]`` -> (int8 ``[M, K]``, float32 scale ``[M]``) with ``x ~= q / scale``."""
    x = _np(x)
    if x.ndim != 2:
        raise ValueError(f"activations must be 2-D [M, K], got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    amax = np.maximum(np.abs(x).max(axis=1), ACT_EPS).astype(np.float32)
    s = (np.float32(127.0) / amax).astype(np.float32)
    q = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int8)
    return q, s


def ternary_matmul_int_ref(xq, wq) -> np.ndarray:
    """int64 ``[M, N]`` = ``xq [M, K] @ wq [N, K]^T``, exact."""
    xq, wq = _np(xq), _np(wq)
    if xq.ndim != 2 or wq.ndim != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"shape mismatch: xq {xq.shape}, wq {wq.shape} (need [M,K] and [N,K])")
    return xq.astype(np.int64) @ wq.astype(np.int64).T


def ternary_matmul_ref(xq, x_scale, wq, w_scale) -> np.ndarray:
    """float32 ``[M, N]`` = ``(xq @ wq^T) * w_scale / x_scale[:, None]`` computed in int64/float64."""
    dots = ternary_matmul_int_ref(xq, wq).astype(np.float64)
    xs = _np(x_scale).astype(np.float64).reshape(-1)
    if xs.shape[0] != dots.shape[0]:
        raise ValueError(f"x_scale has {xs.shape[0]} entries, expected {dots.shape[0]}")
    ws = np.asarray(_np(w_scale), dtype=np.float64)
    if ws.ndim == 0 or ws.size == 1:
        ws = np.full(dots.shape[1], float(ws.reshape(-1)[0]))
    ws = ws.reshape(-1)
    if ws.shape[0] != dots.shape[1]:
        raise ValueError(f"w_scale has {ws.shape[0]} entries, expected 1 or {dots.shape[1]}")
    return (dots * ws[None, :] / xs[:, None]).astype(np.float32)
