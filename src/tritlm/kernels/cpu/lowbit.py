"""CPU kernels for int8, int4 and binary weight matrices, next to :class:`TernaryLinearKernel`.

Same interface as the ternary kernel (:class:`~tritlm.kernels.cpu.ops.LinearKernelBase`):
``kernel(x, out=None)`` for numpy or torch float ``[..., K]`` -> float32 ``[..., N]``,
``matmul_int8(xq, x_scale, out)``, ``int_dots(xq)`` (int8 / binary), ``tune()``, pickling, the
``avx2`` / ``portable`` / ``numpy`` backends, ``threads``. Activations are quantised per token to
int8 (absmax, exactly as for ternary) inside the C call; the C side is ``tritlm_intk.c`` (one
``tt_ctx`` type for every kind, so the fused decode step takes these contexts too).

==========================  ===========================  ==================  =====================
kernel                      levels                       scales              layout (bits/weight)
==========================  ===========================  ==================  =====================
:class:`Int8LinearKernel`   [-127, 127]                  one per row         ``i8_k32`` (8)
:class:`Int4LinearKernel`   [-7, 7]                      one per group of G  ``i4_k64`` (4)
                                                         weights of a row
                                                         (G = 32 / 64 / 128)
:class:`BinaryLinearKernel` {-1, +1}                     one per row         ``b1_k128`` (1)
==========================  ===========================  ==================  =====================

``y[m, n] = sum_k q_w[n, k] q_x[m, k] * scale[n] / x_scale[m] (+ bias[n])``; for int4 the sum
runs per group and each group's integer dot is multiplied by its scale (float32 accumulation).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..pack_rows import (
    INT4_GROUP_SIZES,
    PackedBinary,
    PackedInt4,
    PackedInt8,
    pack_binary_kernel,
    pack_int4,
    pack_int8,
)
from . import build
from .ops import LinearKernelBase, _aligned_copy, _is_torch, _ptr, _vector

__all__ = ["BinaryLinearKernel", "Int4LinearKernel", "Int8LinearKernel"]


def _np32(a) -> np.ndarray:
    return np.asarray(a.detach().cpu().numpy() if _is_torch(a) else a, dtype=np.float32)


class _LowBitKernel(LinearKernelBase):
    """What the int8 / int4 / binary kernels share: the build of the C context."""

    def _new_ctx(self, lib, bias_ptr):
        raise NotImplementedError

    def _build(self, bias, threads, backend, params) -> None:
        self._init_common(bias, threads, backend)
        if self.backend == "numpy":
            return
        self._lib = lib = build.load_library()
        self._data = _aligned_copy(np.ascontiguousarray(self.packed.data))
        self._attach(self._new_ctx(lib, _ptr(self.bias) if self.bias is not None else None), params)

class _RowScaledKernel(_LowBitKernel):
    """A kind with one scale per output row (int8, binary): levels, row scales, a C constructor."""

    _packed_cls: type
    _pack = staticmethod(lambda w: w)
    _k_max = 1 << 22  # int32 accumulation of |x| <= 128 times |w| <= 1
    _ctx_new = ""  # name of the C constructor

    def __init__(self, weight, row_scale=1.0, bias=None, *, threads: int | None = None,
                 backend: str | None = None, params: dict | None = None):
        self.packed = packed = weight if isinstance(weight, self._packed_cls) else type(self)._pack(weight)
        self.n, self.k, self.k_padded = packed.n, packed.k, packed.k_padded
        if self.k > self._k_max:
            raise ValueError(f"K = {self.k} too large for int32 accumulation of {self.kind} weights "
                             f"(max {self._k_max})")
        self.w_scale = _vector(row_scale, self.n, "row_scale")
        self._build(bias, threads, backend, params)

    @property
    def row_scale(self) -> np.ndarray:
        return self.w_scale

    def _new_ctx(self, lib, bias_ptr):
        return getattr(lib, self._ctx_new)(_ptr(self._data), self.n, self.k, self.k_padded, _ptr(self.w_scale),
                                           bias_ptr)

    def _ctor_args(self) -> tuple:
        return (self.packed, self.w_scale)


class Int8LinearKernel(_RowScaledKernel):
    """``y = x @ (q * row_scale[:, None])^T (+ bias)`` for int8 levels ``q`` in [-127, 127].

    Args:
        weight: int8-like ``[N, K]`` levels in [-127, 127], or a :class:`PackedInt8`.
        row_scale: ``[N]`` (or a scalar): W ~= q * row_scale[row].
        bias, threads, backend, params: as :class:`TernaryLinearKernel`.
    """

    kind = "int8"
    _max_level = 127
    _packed_cls = PackedInt8
    _pack = staticmethod(pack_int8)
    _k_max = 1 << 17  # int32 accumulation of int8 x int8
    _ctx_new = "tt_ctx_new_int8"


class BinaryLinearKernel(_RowScaledKernel):
    """``y = x @ (w * row_scale[:, None])^T (+ bias)`` for binary ``w`` in {-1, +1}.

    Args:
        weight: int8-like ``[N, K]`` in {-1, +1}, or a :class:`PackedBinary`.
        row_scale: scalar (per tensor) or ``[N]`` (per row).
        bias, threads, backend, params: as :class:`TernaryLinearKernel`.
    """

    kind = "binary"
    _packed_cls = PackedBinary
    _pack = staticmethod(pack_binary_kernel)
    _ctx_new = "tt_ctx_new_binary"


def _infer_group(k: int, n_groups: int) -> int:
    fits = [g for g in INT4_GROUP_SIZES if -(-k // g) == n_groups]
    if not fits:
        raise ValueError(f"group_scales has {n_groups} groups per row, which fits no group size "
                         f"{INT4_GROUP_SIZES} for K = {k}")
    return 64 if 64 in fits else fits[0]  # several fit only when they give the same groups


class Int4LinearKernel(_LowBitKernel):
    """``y[m, n] = sum_g group_scales[n, g] * (q_x[m, g-th group] . q[n, g-th group]) / x_scale[m]
    (+ bias)`` for int4 levels ``q`` in [-7, 7], one scale per ``group_size`` consecutive weights
    of a row (the last group of a row is short when K is not a multiple).

    Args:
        weight: int8-like ``[N, K]`` levels in [-7, 7], or a :class:`PackedInt4`.
        group_scales: ``[N, ceil(K / group_size)]``.
        group_size: 32, 64 or 128 (None: the packed matrix's, else inferred from the scales' shape).
        bias, threads, backend, params: as :class:`TernaryLinearKernel`.
    """

    exact_int = False
    _max_level = 7

    def __init__(self, weight, group_scales, group_size: int | None = None, bias=None, *,
                 threads: int | None = None, backend: str | None = None, params: dict | None = None):
        gs = _np32(group_scales)
        if isinstance(weight, PackedInt4):
            packed = weight
            if group_size is not None and int(group_size) != packed.group_size:
                if int(group_size) not in INT4_GROUP_SIZES:
                    raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
                packed = dataclasses.replace(packed, group_size=int(group_size))  # levels do not depend on G
        else:
            if group_size is None:
                shape = np.shape(weight)
                n, k = (shape[0], shape[1]) if len(shape) == 2 else (0, 0)
                if n and gs.size % n == 0:
                    group_size = _infer_group(k, gs.size // n)
                else:
                    group_size = 64
            packed = pack_int4(weight, group_size)
        self.packed = packed
        self.n, self.k, self.k_padded = packed.n, packed.k, packed.k_padded
        self.group_size = packed.group_size
        self.kind = f"int4g{self.group_size}"
        if self.k > (1 << 22):
            raise ValueError(f"K = {self.k} too large (max {1 << 22})")
        ng = packed.n_groups
        if gs.size != self.n * ng:
            raise ValueError(f"group_scales must have shape [N, ceil(K / {self.group_size})] = "
                             f"[{self.n}, {ng}], got {gs.shape}")
        self.group_scales = np.ascontiguousarray(gs.reshape(self.n, ng))
        self._build(bias, threads, backend, params)

    def _new_ctx(self, lib, bias_ptr):
        return lib.tt_ctx_new_int4(_ptr(self._data), self.n, self.k, self.k_padded, self.group_size,
                                   _ptr(self.group_scales), bias_ptr)

    def _ctor_args(self) -> tuple:
        return (self.packed, self.group_scales, self.group_size)

    def _numpy_out(self, xq: np.ndarray, xs: np.ndarray) -> np.ndarray:
        if self._dense is None:  # dequantised W^T in float64
            scale = np.repeat(self.group_scales.astype(np.float64), self.group_size, axis=1)[:, : self.k]
            self._dense = np.ascontiguousarray((self.packed.unpack() * scale).T)
        return (xq.astype(np.float64) @ self._dense) * (1.0 / xs.astype(np.float64))[:, None]
