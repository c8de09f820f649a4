"""Kernel layouts of the int8, int4 and binary weight kinds (read by ``kernels/cpu/tritlm_intk.c``),
and row concatenation of packed matrices of any kind (numpy only; exact round trips).

All three are row-major (row ``n`` is bytes ``[n * row_bytes, (n+1) * row_bytes)``), so fusing
matrices that share K (q/k/v, gate/up) is a plain row concatenation (:func:`concat_rows`). Scales
are not part of the packed levels (the kernel objects take them separately).

``i8_k32`` int8, 8 bits per weight (:func:`pack_int8` / :func:`unpack_int8`, :class:`PackedInt8`)
    levels in [-127, 127] (-128 is rejected: the kernels' sign trick needs ``|w| <= 127``); int8
    ``[N, k_padded]``, ``k_padded = 32 * ceil(K/32)``, padding weights 0.

``i4_k64`` int4, 4 bits per weight (:func:`pack_int4` / :func:`unpack_int4`, :class:`PackedInt4`)
    levels in [-7, 7] as offset nibbles ``q + 8`` (1..15; padding weights are 0, nibble 8);
    ``k_padded = 64 * ceil(K/64)``; uint8 ``[N, k_padded/2]``: each row is cut into blocks of 64
    weights stored in 32 bytes, byte ``j`` of block ``b`` = ``(q[64b+j] + 8) | (q[64b+32+j] + 8) << 4``
    (one and/shift of a 32-byte vector gives 32 consecutive weights). ``group_size`` (32 / 64 / 128)
    records the scale groups the levels were quantised with: one scale per ``group_size``
    consecutive weights of a row, the last group of a row short when K is not a multiple.

``b1_k128`` binary, 1 bit per weight (:func:`pack_binary_kernel` / :func:`unpack_binary_kernel`,
    :class:`PackedBinary`) values in {-1, +1}, bit = (w > 0); ``k_padded = 128 * ceil(K/128)``;
    uint8 ``[N, k_padded/8]``: blocks of 128 weights in 16 bytes, bit ``s`` of byte ``j`` of
    block ``b`` = weight ``128b + 16s + j``; padding bits 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .pack import PackedTernary, _as_int_matrix, pack_ternary_kernel

__all__ = ["INT4_GROUP_SIZES", "PackedBinary", "PackedInt4", "PackedInt8", "concat_rows", "pack_binary_kernel",
           "pack_int4", "pack_int8", "unpack_binary_kernel", "unpack_int4", "unpack_int8"]

# --------------------------------------------------------------------------- int8 / int4 / binary kernels
INT8_ALIGN, INT4_ALIGN, BINARY_ALIGN = 32, 64, 128  # K granularity of each kernel layout
INT4_GROUP_SIZES = (32, 64, 128)


def _check_levels(w, lo: int, hi: int, name: str) -> np.ndarray:
    w = _as_int_matrix(w, name)
    bad = (w < lo) | (w > hi)
    if bad.any():
        vals = np.unique(w[bad])[:5].tolist()
        raise ValueError(f"{name} must be in [{lo}, {hi}]; found e.g. {vals}")
    return w


def _check_sizes(p, cls, align: int, cols_per_weight: float) -> np.ndarray:
    if not isinstance(p, cls):
        raise ValueError(f"expected a {cls.__name__}, got {type(p).__name__}")  # noqa: TRY004
    if p.layout != cls.layout:
        raise ValueError(f"unknown {cls.__name__} layout {p.layout!r}")
    if p.k <= 0 or p.n <= 0 or p.k_padded != -(-p.k // align) * align:
        raise ValueError(f"inconsistent sizes n={p.n} k={p.k} k_padded={p.k_padded}")
    data = np.asarray(p.data)
    expect = (p.n, int(p.k_padded * cols_per_weight))
    if data.shape != expect:
        raise ValueError(f"packed data has shape {data.shape}, expected {expect}")
    return data


class _PackedRows:
    """Shared bits of the row-major kernel layouts (int8 / int4 / binary)."""

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def row_bytes(self) -> int:
        return int(self.data.shape[1])


@dataclass
class PackedInt8(_PackedRows):
    """int8 levels in the ``i8_k32`` layout: ``data`` int8 ``[n, k_padded]`` (see module docstring)."""

    data: np.ndarray
    n: int
    k: int
    k_padded: int
    layout: str = "i8_k32"
    bits: ClassVar[int] = 8  # per stored weight

    def unpack(self) -> np.ndarray:
        """int8 ``[n, k]`` levels."""
        return unpack_int8(self)


@dataclass
class PackedInt4(_PackedRows):
    """int4 levels in the ``i4_k64`` layout: ``data`` uint8 ``[n, k_padded/2]`` (module docstring)."""

    data: np.ndarray
    n: int
    k: int
    k_padded: int
    group_size: int = 64
    layout: str = "i4_k64"
    bits: ClassVar[int] = 4  # per stored weight

    @property
    def n_groups(self) -> int:
        """Scale groups per row, ``ceil(k / group_size)``."""
        return -(-self.k // self.group_size)

    def unpack(self) -> np.ndarray:
        """int8 ``[n, k]`` levels in [-7, 7]."""
        return unpack_int4(self)


@dataclass
class PackedBinary(_PackedRows):
    """{-1, +1} weights in the ``b1_k128`` layout: ``data`` uint8 ``[n, k_padded/8]``."""

    data: np.ndarray
    n: int
    k: int
    k_padded: int
    layout: str = "b1_k128"
    bits: ClassVar[int] = 1  # per stored weight

    def unpack(self) -> np.ndarray:
        """int8 ``[n, k]`` in {-1, +1}."""
        return unpack_binary_kernel(self)


def pack_int8(w) -> PackedInt8:
    """int8 levels ``[N, K]`` in [-127, 127] -> :class:`PackedInt8` (K padded to 32 with zeros)."""
    w = _check_levels(w, -127, 127, "int8 weights")
    n, k = w.shape
    kp = -(-k // INT8_ALIGN) * INT8_ALIGN
    data = np.zeros((n, kp), dtype=np.int8)
    data[:, :k] = w
    return PackedInt8(data=data, n=n, k=k, k_padded=kp)


def unpack_int8(p: PackedInt8) -> np.ndarray:
    """Inverse of :func:`pack_int8`: int8 ``[n, k]``."""
    data = _check_sizes(p, PackedInt8, INT8_ALIGN, 1)
    if data.dtype != np.int8:
        raise ValueError(f"packed int8 data must be int8, got {data.dtype}")
    if (data == -128).any():
        raise ValueError("packed int8 weights contain the invalid level -128")
    return np.ascontiguousarray(data[:, : p.k])


def _check_group(group_size) -> int:
    if int(group_size) not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    return int(group_size)


def pack_int4(w, group_size: int = 64) -> PackedInt4:
    """int4 levels ``[N, K]`` in [-7, 7] -> :class:`PackedInt4` (offset nibbles, K padded to 64)."""
    g = _check_group(group_size)
    w = _check_levels(w, -7, 7, "int4 weights")
    n, k = w.shape
    kp = -(-k // INT4_ALIGN) * INT4_ALIGN
    codes = np.full((n, kp), 8, dtype=np.uint8)
    codes[:, :k] = (w + 8).astype(np.uint8)
    c = codes.reshape(n, kp // 64, 2, 32)  # [n, block, low/high half, j]
    data = (c[:, :, 0] | (c[:, :, 1] << 4)).astype(np.uint8).reshape(n, kp // 2)
    return PackedInt4(data=data, n=n, k=k, k_padded=kp, group_size=g)


def unpack_int4(p: PackedInt4) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 ``[n, k]`` in [-7, 7]."""
    data = _check_sizes(p, PackedInt4, INT4_ALIGN, 0.5)
    _check_group(p.group_size)
    if data.dtype != np.uint8:
        raise ValueError(f"packed int4 data must be uint8, got {data.dtype}")
    d = data.reshape(p.n, p.k_padded // 64, 1, 32)
    codes = np.concatenate([d & 15, d >> 4], axis=2).reshape(p.n, p.k_padded)[:, : p.k]
    if (codes == 0).any():
        raise ValueError("packed int4 weights contain the invalid nibble 0 (level -8)")
    return (codes.astype(np.int8) - 8).astype(np.int8)


_B1_SHIFTS = np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)


def pack_binary_kernel(w) -> PackedBinary:
    """Binary {-1, +1} ``[N, K]`` -> :class:`PackedBinary` (``b1_k128``, K padded to 128)."""
    w = _as_int_matrix(w, "binary weights")
    bad = (w != -1) & (w != 1)
    if bad.any():
        vals = np.unique(w[bad])[:5].tolist()
        raise ValueError(f"binary weights must be in {{-1, 1}}; found e.g. {vals}")
    n, k = w.shape
    kp = -(-k // BINARY_ALIGN) * BINARY_ALIGN
    bits = np.zeros((n, kp), dtype=np.uint8)
    bits[:, :k] = w > 0
    b = bits.reshape(n, kp // 128, 8, 16) << _B1_SHIFTS  # [n, block, s, j]
    data = np.bitwise_or.reduce(b, axis=2).astype(np.uint8).reshape(n, kp // 8)
    return PackedBinary(data=data, n=n, k=k, k_padded=kp)


def unpack_binary_kernel(p: PackedBinary) -> np.ndarray:
    """Inverse of :func:`pack_binary_kernel`: int8 ``[n, k]`` in {-1, +1}."""
    data = _check_sizes(p, PackedBinary, BINARY_ALIGN, 1 / 8)
    if data.dtype != np.uint8:
        raise ValueError(f"packed binary data must be uint8, got {data.dtype}")
    bits = (data.reshape(p.n, p.k_padded // 128, 1, 16) >> _B1_SHIFTS) & 1
    return (bits.reshape(p.n, p.k_padded)[:, : p.k].astype(np.int8) * 2 - 1).astype(np.int8)


def concat_rows(parts):
    """Row-concatenate packed matrices of one kind that share K (e.g. q, k, v -> one q|k|v matrix).

    Works for :class:`PackedInt8`, :class:`PackedInt4` (same ``group_size``), :class:`PackedBinary`
    (a plain concatenation of the packed rows) and :class:`PackedTernary` (``i2s_r4``: without
    unpacking when every N is a multiple of 4).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("concat_rows: no parts")
    cls = type(parts[0])
    if any(type(p) is not cls for p in parts):
        raise ValueError("concat_rows: all parts must be the same packed kind")
    k = parts[0].k
    if any(p.k != k for p in parts):
        raise ValueError("concat_rows: all parts must have the same K")
    n = sum(p.n for p in parts)
    if cls is PackedTernary:
        if all(p.layout == "i2s_r4" and p.n % 4 == 0 for p in parts):
            data = np.concatenate([p.data for p in parts], axis=0)
            return PackedTernary(data=data, n=n, k=k, k_padded=parts[0].k_padded)
        return pack_ternary_kernel(np.concatenate([p.unpack() for p in parts], axis=0))
    if cls not in (PackedInt8, PackedInt4, PackedBinary):
        raise ValueError(f"concat_rows: unsupported type {cls.__name__}")
    if any(p.layout != parts[0].layout or p.k_padded != parts[0].k_padded for p in parts):
        raise ValueError("concat_rows: all parts must have the same layout and k_padded")
    data = np.concatenate([np.asarray(p.data) for p in parts], axis=0)
    if cls is PackedInt4:
        g = parts[0].group_size
        if any(p.group_size != g for p in parts):
            raise ValueError("concat_rows: int4 parts must have the same group_size")
        return PackedInt4(data=data, n=n, k=k, k_padded=parts[0].k_padded, group_size=g)
    return cls(data=data, n=n, k=k, k_padded=parts[0].k_padded)
