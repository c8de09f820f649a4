"""Bit packing of ternary {-1, 0, +1} and binary {-1, +1} weight matrices (numpy only).

Every function takes a 2-D ``[N, K]`` matrix (N output rows, K inputs, the ``nn.Linear.weight``
orientation) and every ``unpack_*`` gives back exactly the input: the round trips are exact.
Inputs are validated: wrong rank, wrong dtype kind or out-of-range values raise ``ValueError``.
Padding weights added to reach a whole byte/block are always *zero* weights (ternary) and are
dropped again by ``unpack``.

Layouts
-------
``plain`` 2-bit, 4 weights per byte (:func:`pack_2bit` / :func:`unpack_2bit`)
    code = w + 1 in {0, 1, 2}; output uint8 ``[N, ceil(K/4)]``, row-major. Weight ``k`` of a row
    lives in byte ``k // 4``, bits ``2*(k % 4) + 1 : 2*(k % 4)`` (first weight in the low bits).
    K is padded with code 1 (weight 0). Code 3 is invalid.

``i2s`` / ``i2s_r4`` kernel layout (:func:`pack_ternary_kernel` / :func:`unpack_ternary_kernel`)
    The layout the CPU kernels read, after bitnet.cpp's I2_S. code = w + 1 in 2 bits; K is padded
    with zero weights to ``k_padded = 128 * ceil(K/128)``; each row is cut into ``KB = k_padded/128``
    blocks of 128 weights stored in 32 bytes. In block ``b``, byte ``j`` (0..31) holds

    ====== ==================
    bits   weight (row index)
    ====== ==================
    1:0    ``128*b + j``
    3:2    ``128*b + j + 32``
    5:4    ``128*b + j + 64``
    7:6    ``128*b + j + 96``
    ====== ==================

    so one shift-and-mask of a 32-byte vector gives 32 consecutive codes that line up with 32
    consecutive int8 activations (the same in-block order as llama.cpp's TQ2_0 32-byte halves).

    ``i2s`` (``interleave=1``): uint8 ``[N, KB, 32]``: row n, block b at byte ``(n*KB + b)*32``.

    ``i2s_r4`` (``interleave=4``, the default and the one the kernels use): rows are grouped in
    fours (N padded to ``n_padded = 4*ceil(N/4)`` with all-zero rows) and the 32-byte blocks of the
    four rows of a group are interleaved so that a GEMV reads one sequential stream:
    uint8 ``[n_padded/4, KB, 4, 32]``; row ``n = 4*g + r``, block ``b`` at byte
    ``((g*KB + b)*4 + r)*32``.

``base3`` 1.6-bit, 5 weights per byte (:func:`pack_base3` / :func:`unpack_base3`)
    byte = sum_{i=0..4} (w[5c+i] + 1) * 3**i  (< 243); output uint8 ``[N, ceil(K/5)]``, K padded
    with zero weights (digit 1). Bytes >= 243 are invalid. (Plain base-3; not TQ1_0's scaled form.)

``binary`` 1-bit, 8 weights per byte (:func:`pack_binary` / :func:`unpack_binary`)
    bit = (w > 0), input values must be in {-1, +1}; output uint8 ``[N, ceil(K/8)]``; weight k in
    byte ``k // 8``, bit ``k % 8`` (LSB first, numpy ``bitorder="little"``); padding bits are 0.

Kernel layouts of the other weight kinds (read by ``kernels/cpu/tritlm_intk.c``)
-------------------------------------------------------------------------------
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

__all__ = [
    "BLOCK",
    "PackedBase3",
    "pack_base3_rows",
    "INT4_GROUP_SIZES",
    "PackedBinary",
    "PackedInt4",
    "PackedInt8",
    "PackedTernary",
    "concat_rows",
    "pack_2bit",
    "pack_base3",
    "pack_binary",
    "pack_binary_kernel",
    "pack_int4",
    "pack_int8",
    "pack_ternary_kernel",
    "unpack_2bit",
    "unpack_base3",
    "unpack_binary",
    "unpack_binary_kernel",
    "unpack_int4",
    "unpack_int8",
    "unpack_ternary_kernel",
]

BLOCK = 128  # weights per kernel block (32 bytes)
_BLOCK_BYTES = BLOCK // 4
_LAYOUTS = {1: "i2s", 4: "i2s_r4"}


# --------------------------------------------------------------------------- validation helpers
def _as_int_matrix(w, name: str = "weights") -> np.ndarray:
    """Return ``w`` as a 2-D int8 array, raising ValueError for bad rank / dtype."""
    if hasattr(w, "detach") and hasattr(w, "cpu"):  # a torch tensor (torch is not imported here)
        w = w.detach().cpu().numpy()
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, K] matrix, got shape {w.shape}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {w.shape}")
    if w.dtype.kind == "b":
        raise ValueError(f"{name} must hold integer values, got dtype bool")
    if w.dtype.kind == "f":
        if not np.all(np.isfinite(w)) or not np.all(w == np.round(w)):
            raise ValueError(f"{name} must hold integer values, got non-integer floats")
    elif w.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer (or integral float) array, got dtype {w.dtype}")
    if w.dtype.kind in "f" or w.dtype.itemsize > 1 or w.dtype.kind == "u":
        lo, hi = w.min(), w.max()
        if lo < -128 or hi > 127:
            raise ValueError(f"{name} values out of range: min {lo}, max {hi}")
    return w.astype(np.int8, copy=False)


def _check_ternary(w, name: str = "ternary weights") -> np.ndarray:
    w = _as_int_matrix(w, name)
    bad = (w < -1) | (w > 1)
    if bad.any():
        vals = np.unique(w[bad])[:5].tolist()
        raise ValueError(f"{name} must be in {{-1, 0, 1}}; found e.g. {vals}")
    return w


def _check_packed(p, ncols: int, name: str) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim != 2:
        raise ValueError(f"{name} must be a 2-D uint8 array, got shape {p.shape}")
    if p.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {p.dtype}")
    if p.shape[1] != ncols:
        raise ValueError(f"{name} has {p.shape[1]} columns, expected {ncols} for the given k")
    return p


def _check_k(k) -> int:
    if not isinstance(k, (int, np.integer)) or int(k) <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


# --------------------------------------------------------------------------- plain 2-bit
def pack_2bit(w) -> np.ndarray:
    """Ternary ``[N, K]`` -> uint8 ``[N, ceil(K/4)]``, code w+1, weight 4c+i in bits 2i+1:2i."""
    w = _check_ternary(w)
    n, k = w.shape
    kp = -(-k // 4) * 4
    codes = np.ones((n, kp), dtype=np.uint8)
    codes[:, :k] = (w + 1).astype(np.uint8)
    c = codes.reshape(n, kp // 4, 4)
    return (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).astype(np.uint8)


def unpack_2bit(packed, k: int) -> np.ndarray:
    """Inverse of :func:`pack_2bit`: uint8 ``[N, ceil(k/4)]`` -> int8 ``[N, k]``."""
    k = _check_k(k)
    p = _check_packed(packed, -(-k // 4), "packed 2-bit weights")
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    codes = (p[:, :, None] >> shifts) & 3
    if (codes == 3).any():
        raise ValueError("packed 2-bit weights contain the invalid code 3")
    return (codes.reshape(p.shape[0], -1)[:, :k].astype(np.int8) - 1).astype(np.int8)


# --------------------------------------------------------------------------- kernel (I2_S-like)
@dataclass
class PackedTernary:
    """Ternary weights in the kernel layout (see module docstring).

    ``data`` is uint8 ``[n_padded/4, k_padded/128, 4, 32]`` for ``layout == "i2s_r4"`` and
    ``[n, k_padded/128, 32]`` for ``layout == "i2s"``; ``n``/``k`` are the logical sizes.
    """

    data: np.ndarray
    n: int
    k: int
    k_padded: int
    layout: str = "i2s_r4"

    @property
    def interleave(self) -> int:
        return 4 if self.layout == "i2s_r4" else 1

    @property
    def n_padded(self) -> int:
        r = self.interleave
        return -(-self.n // r) * r

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def unpack(self) -> np.ndarray:
        """int8 ``[n, k]`` weights."""
        return unpack_ternary_kernel(self)


def pack_ternary_kernel(wq, interleave: int = 4) -> PackedTernary:
    """Ternary int8 ``[N, K]`` -> :class:`PackedTernary` in the I2_S-like kernel layout.

    ``interleave=4`` (layout ``"i2s_r4"``, what the CPU kernels read) or ``1`` (``"i2s"``).
    """
    if interleave not in _LAYOUTS:
        raise ValueError(f"interleave must be 1 or 4, got {interleave!r}")
    w = _check_ternary(wq)
    n, k = w.shape
    kp = -(-k // BLOCK) * BLOCK
    npad = -(-n // interleave) * interleave
    kb = kp // BLOCK
    codes = np.ones((npad, kp), dtype=np.uint8)
    codes[:n, :k] = (w + 1).astype(np.uint8)
    # [npad, KB, 4 (sub-slice s), 32 (j)] : weight 128*b + 32*s + j
    c = codes.reshape(npad, kb, 4, _BLOCK_BYTES)
    blocks = (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).astype(np.uint8)
    if interleave == 4:
        data = np.ascontiguousarray(blocks.reshape(npad // 4, 4, kb, _BLOCK_BYTES).transpose(0, 2, 1, 3))
    else:
        data = np.ascontiguousarray(blocks)
    return PackedTernary(data=data, n=n, k=k, k_padded=kp, layout=_LAYOUTS[interleave])


def unpack_ternary_kernel(p: PackedTernary) -> np.ndarray:
    """Inverse of :func:`pack_ternary_kernel`: int8 ``[n, k]``."""
    if not isinstance(p, PackedTernary):
        raise ValueError(f"expected a PackedTernary, got {type(p).__name__}")  # noqa: TRY004
    if p.layout not in _LAYOUTS.values():
        raise ValueError(f"unknown kernel layout {p.layout!r}")
    if p.k <= 0 or p.n <= 0 or p.k_padded != -(-p.k // BLOCK) * BLOCK:
        raise ValueError(f"inconsistent sizes n={p.n} k={p.k} k_padded={p.k_padded}")
    kb = p.k_padded // BLOCK
    data = np.asarray(p.data)
    if data.dtype != np.uint8:
        raise ValueError(f"packed data must be uint8, got {data.dtype}")
    if p.layout == "i2s_r4":
        expect = (p.n_padded // 4, kb, 4, _BLOCK_BYTES)
        if data.shape != expect:
            raise ValueError(f"packed data has shape {data.shape}, expected {expect}")
        blocks = data.transpose(0, 2, 1, 3).reshape(p.n_padded, kb, _BLOCK_BYTES)
    else:
        expect = (p.n, kb, _BLOCK_BYTES)
        if data.shape != expect:
            raise ValueError(f"packed data has shape {data.shape}, expected {expect}")
        blocks = data
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (blocks[:, :, None, :] >> shifts) & 3  # [rows, KB, s, j]
    if (codes == 3).any():
        raise ValueError("packed kernel weights contain the invalid code 3")
    w = codes.reshape(blocks.shape[0], p.k_padded)[: p.n, : p.k].astype(np.int8) - 1
    return w.astype(np.int8)


# --------------------------------------------------------------------------- base-3 (1.6 bit)
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def pack_base3(w) -> np.ndarray:
    """Ternary ``[N, K]`` -> uint8 ``[N, ceil(K/5)]``, byte = sum (w_i+1) * 3**i, i = 0..4."""
    w = _check_ternary(w)
    n, k = w.shape
    kp = -(-k // 5) * 5
    d = np.ones((n, kp), dtype=np.uint8)
    d[:, :k] = (w + 1).astype(np.uint8)
    return (d.reshape(n, kp // 5, 5) * _POW3).sum(axis=-1, dtype=np.uint16).astype(np.uint8)


def unpack_base3(packed, k: int) -> np.ndarray:
    """Inverse of :func:`pack_base3`: uint8 ``[N, ceil(k/5)]`` -> int8 ``[N, k]``."""
    k = _check_k(k)
    p = _check_packed(packed, -(-k // 5), "packed base-3 weights")
    if (p >= 243).any():
        raise ValueError("packed base-3 weights contain bytes >= 243 (invalid)")
    digits = (p[:, :, None] // _POW3) % 3
    return (digits.reshape(p.shape[0], -1)[:, :k].astype(np.int8) - 1).astype(np.int8)


@dataclass
class PackedBase3:
    """Ternary levels stored base-3, 5 weights a byte (1.6 bits; :func:`pack_base3`): a storage
    layout (packed folders, ``--ternary-layout base3``); the kernels run it after unpacking to
    ``i2s_r4``."""

    data: np.ndarray  # uint8 [n, ceil(k / 5)]
    n: int
    k: int
    layout: str = "base3"
    bits: ClassVar[float] = 1.6

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def unpack(self) -> np.ndarray:
        return unpack_base3(self.data, self.k)


def pack_base3_rows(w) -> PackedBase3:
    w = _check_ternary(w)
    return PackedBase3(pack_base3(w), w.shape[0], w.shape[1])


# --------------------------------------------------------------------------- binary (1 bit)
def pack_binary(w) -> np.ndarray:
    """Binary {-1, +1} ``[N, K]`` -> uint8 ``[N, ceil(K/8)]``, bit k%8 of byte k//8 = (w > 0)."""
    w = _as_int_matrix(w, "binary weights")
    bad = (w != -1) & (w != 1)
    if bad.any():
        vals = np.unique(w[bad])[:5].tolist()
        raise ValueError(f"binary weights must be in {{-1, 1}}; found e.g. {vals}")
    return np.packbits(w > 0, axis=1, bitorder="little")


def unpack_binary(packed, k: int) -> np.ndarray:
    """Inverse of :func:`pack_binary`: uint8 ``[N, ceil(k/8)]`` -> int8 ``[N, k]`` in {-1, +1}."""
    k = _check_k(k)
    p = _check_packed(packed, -(-k // 8), "packed binary weights")
    bits = np.unpackbits(p, axis=1, count=k, bitorder="little")
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


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
