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

The int8, int4 and binary kernel layouts live in :mod:`tritlm.kernels.pack_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

__all__ = [
    "BLOCK",
    "PackedBase3",
    "pack_base3_rows",
    "PackedTernary",
    "pack_2bit",
    "pack_base3",
    "pack_binary",
    "pack_ternary_kernel",
    "unpack_2bit",
    "unpack_base3",
    "unpack_binary",
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
