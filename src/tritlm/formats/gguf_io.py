"""A small, strict GGUF container reader/writer (versions 1-3 read, version 3 written).

Why not ``gguf.GGUFReader``/``GGUFWriter`` alone: bitnet.cpp's I2_S (type id 36) is not in the
upstream enum (upstream 36 was IQ4_NL_4_4, since removed), its byte size is not blocks x block size
(n/4 packed bytes + a 32-byte tail holding the f32 scale), and a loader for untrusted files must turn
every truncation or inconsistency into one FormatError line rather than a numpy/struct traceback.
The ``gguf`` package is still used to dequantise block types (TQ1_0/TQ2_0/Q8_0/Q4_0) and the tests
read our files with ``gguf.GGUFReader`` as an independent check.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tritlm.errors import FormatError

MAGIC = b"GGUF"
ALIGN = 32
# ggml type ids. I2_S = 36 is bitnet.cpp's id (its fork of ggml); upstream ggml gave 36 to
# IQ4_NL_4_4 (removed) - so a file with type 36 is only meaningful to bitnet.cpp.
F32, F16, Q4_0, Q8_0, TQ1_0, TQ2_0, I2_S = 0, 1, 2, 8, 34, 35, 36
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q8_0: "Q8_0", TQ1_0: "TQ1_0", TQ2_0: "TQ2_0", I2_S: "I2_S"}
# (weights per block, bytes per block)
_BLOCK = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q8_0: (32, 34), TQ1_0: (256, 54), TQ2_0: (256, 66)}

# GGUF metadata value types
_U8, _I8, _U16, _I16, _U32, _I32, _F32, _BOOL, _STR, _ARR, _U64, _I64, _F64 = range(13)
_SCALAR = {_U8: "<B", _I8: "<b", _U16: "<H", _I16: "<h", _U32: "<I", _I32: "<i", _F32: "<f", _BOOL: "<?",
           _U64: "<Q", _I64: "<q", _F64: "<d"}
_NP = {_U8: "<u1", _I8: "<i1", _U16: "<u2", _I16: "<i2", _U32: "<u4", _I32: "<i4", _F32: "<f4", _U64: "<u8",
       _I64: "<i8", _F64: "<f8", _BOOL: "<u1"}
MAX_DIMS = 4
_MAX_COUNT = 1 << 40  # no real file has more entries; a larger count is corruption
# arrays of arrays: llama.cpp writes none, the spec allows them; deeper nesting is corruption (and
# would otherwise end in a RecursionError)
MAX_NESTING = 8


def tensor_nbytes(ttype: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ggml type ``ttype`` with GGUF dims ``shape`` (ne0 = innermost first)."""
    n = math.prod(int(d) for d in shape)  # Python ints: a corrupt shape must not wrap around int64
    if ttype == I2_S:
        # bitnet.cpp: ggml_nbytes(I2_S) = n / 4 + 32 (packed codes, then the f32 scale, padded to 32)
        return n // 4 + 32
    if ttype not in _BLOCK:
        raise FormatError(f"unsupported ggml tensor type {ttype}")
    bs, bb = _BLOCK[ttype]
    if shape and shape[0] % bs:
        raise FormatError(f"tensor row of {shape[0]} is not a multiple of the {TYPE_NAMES[ttype]} block ({bs})")
    return n // bs * bb


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (contiguous) first
    ttype: int
    offset: int  # relative to the data section
    nbytes: int = 0

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.ttype, f"type{self.ttype}")


@dataclass
class GGUFFile:
    path: Path
    version: int
    kv: dict[str, Any]
    kv_types: dict[str, int]
    tensors: list[TensorInfo]
    data_offset: int
    alignment: int
    file_size: int
    problems: list[str] = field(default_factory=list)  # non-fatal findings (misalignment...)
    _buf: Any = None

    def tensor_bytes(self, t: TensorInfo) -> np.ndarray:
        start = self.data_offset + t.offset
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes, offset=start)

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


class _Cursor:
    def __init__(self, buf: memoryview, path: Path, version: int = 3):
        self.buf, self.pos, self.path, self.version = buf, 0, path, version

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"{self.path}: truncated GGUF file (ends inside {what} at byte {self.pos})")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def count(self, what: str) -> int:
        n = self.unpack("<I" if self.version == 1 else "<Q", what)
        if n > _MAX_COUNT:
            raise FormatError(f"{self.path}: corrupt GGUF file ({what} = {n})")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} is not valid UTF-8 (corrupt file)") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if depth > MAX_NESTING:
            raise FormatError(f"{self.path}: metadata {what} nests arrays more than {MAX_NESTING} deep (corrupt file)")
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)
        if vtype == _STR:
            return self.string(what)
        if vtype == _ARR:
            etype = self.unpack("<I", f"{what} array type")
            n = self.count(f"{what} array length")
            if etype in _NP:
                size = np.dtype(_NP[etype]).itemsize
                self.need(n * size, what)
                a = np.frombuffer(self.buf, dtype=_NP[etype], count=n, offset=self.pos).copy()
                self.pos += n * size
                return a.astype(bool) if etype == _BOOL else a
            if etype in (_STR, _ARR):
                if n > len(self.buf) - self.pos:  # every element takes at least one byte
                    raise FormatError(f"{self.path}: truncated GGUF file (array {what} of {n} entries)")
                return [self.value(etype, what, depth + 1) for _ in range(n)]
            raise FormatError(f"{self.path}: unknown array element type {etype} in {what} (corrupt file)")
        raise FormatError(f"{self.path}: unknown metadata value type {vtype} in {what} (corrupt file)")


def read_gguf(path: str | Path, strict: bool = True) -> GGUFFile:
    """Parse the header, metadata and tensor table; tensor data is memory-mapped, not copied.

    ``strict=False`` accepts tensor offsets that violate the alignment (recorded in ``problems``),
    which :func:`repair` needs in order to rewrite such files.
    """
    p = Path(path)
    if not p.is_file():  # a FIFO or a device: never map or read it
        raise FormatError(f"{p} is missing or not a regular file")
    try:
        size = p.stat().st_size
        if size == 0:
            raise FormatError(f"{p}: empty file, not a GGUF model")
        buf = np.memmap(p, dtype=np.uint8, mode="r")
    except OSError as e:
        raise FormatError(f"cannot read {p}: {e.strerror or e}") from None
    mv = memoryview(buf)
    if bytes(mv[:4]) != MAGIC:
        raise FormatError(f"{p}: not a GGUF file (bad magic {bytes(mv[:4])!r})")
    c = _Cursor(mv, p)
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in (1, 2, 3):
        raise FormatError(f"{p}: unsupported GGUF version {version} (1-3 are read)")
    c.version = version
    n_tensors = c.count("tensor count")
    n_kv = c.count("metadata count")
    kv: dict[str, Any] = {}
    kv_types: dict[str, int] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.unpack("<I", f"type of {key}")
        kv[key] = c.value(vtype, key)
        kv_types[key] = vtype
    if n_tensors > (size - c.pos) // 8:
        raise FormatError(f"{p}: corrupt GGUF file ({n_tensors} tensors cannot fit in {size} bytes)")
    tensors: list[TensorInfo] = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}")
        nd = c.unpack("<I", f"dims of {name}")
        if nd == 0 or nd > MAX_DIMS:
            raise FormatError(f"{p}: tensor {name} has {nd} dimensions (corrupt file)")
        shape = tuple(int(c.unpack("<I" if version == 1 else "<Q", f"shape of {name}")) for _ in range(nd))
        if any(d <= 0 or d > _MAX_COUNT for d in shape):
            raise FormatError(f"{p}: tensor {name} has an invalid shape {shape}")
        ttype = c.unpack("<I", f"type of {name}")
        off = c.unpack("<Q", f"offset of {name}")
        t = TensorInfo(name, shape, ttype, off)
        try:
            t.nbytes = tensor_nbytes(ttype, shape)
        except FormatError as e:
            raise FormatError(f"{p}: tensor {name}: {e}") from None
        tensors.append(t)
    align = kv.get("general.alignment", ALIGN)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise FormatError(f"{p}: general.alignment {align!r} is not a positive power of two")
    data_offset = -(-c.pos // align) * align
    f = GGUFFile(p, version, kv, kv_types, tensors, data_offset, align, size, _buf=buf)
    names = set()
    for t in tensors:
        if t.name in names:
            raise FormatError(f"{p}: tensor {t.name} appears twice")
        names.add(t.name)
        if t.offset % align:
            msg = f"tensor {t.name} is at offset {t.offset}, not a multiple of the alignment {align}"
            if strict:
                raise FormatError(f"{p}: {msg} (tritlm repair can rewrite it)")
            f.problems.append(msg)
        if data_offset + t.offset + t.nbytes > size:
            raise FormatError(f"{p}: truncated GGUF file (tensor {t.name} ends at byte "
                              f"{data_offset + t.offset + t.nbytes}, the file has {size})")
    return f


# ---- writing ------------------------------------------------------------------------------------
def _pack_value(v: Any, vtype: int | None = None) -> tuple[int, bytes]:
    if vtype is None:
        if isinstance(v, bool):
            vtype = _BOOL
        elif isinstance(v, int):
            vtype = _U32 if 0 <= v < 1 << 32 else _I64
        elif isinstance(v, float):
            vtype = _F32
        elif isinstance(v, str):
            vtype = _STR
        elif isinstance(v, (list, tuple, np.ndarray)):
            vtype = _ARR
        else:
            raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")
    if vtype in _SCALAR:
        return vtype, struct.pack(_SCALAR[vtype], v)
    if vtype == _STR:
        b = v.encode("utf-8")
        return vtype, struct.pack("<Q", len(b)) + b
    # arrays: numpy arrays keep their dtype; lists of str are string arrays
    if isinstance(v, np.ndarray):
        rev = {np.dtype(t).str: k for k, t in _NP.items() if k != _BOOL}
        et = rev[v.dtype.newbyteorder("<").str]
        return vtype, struct.pack("<IQ", et, len(v)) + v.astype(_NP[et]).tobytes()
    items = list(v)
    if all(isinstance(x, str) for x in items):
        return vtype, struct.pack("<IQ", _STR, len(items)) + b"".join(_pack_value(x, _STR)[1] for x in items)
    if all(isinstance(x, int) for x in items):
        return _pack_value(np.asarray(items, dtype="<i4"))
    if all(isinstance(x, float) for x in items):
        return _pack_value(np.asarray(items, dtype="<f4"))
    raise TypeError("GGUF arrays must hold one type")


def write_gguf(path: str | Path, kv: dict[str, Any], tensors: list[tuple[str, tuple[int, ...], int, bytes]],
               kv_types: dict[str, int] | None = None, alignment: int = ALIGN) -> None:
    """Write a GGUF v3 file. ``tensors``: (name, GGUF shape (ne0 first), ggml type, raw bytes).
    ``kv_types`` pins a key's value type (for rewriting a file with its original types)."""
    kv = dict(kv)
    kv["general.alignment"] = alignment
    kv_types = dict(kv_types or {})
    kv_types["general.alignment"] = _U32
    out = bytearray(MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for k, v in kv.items():
        vt, payload = _pack_value(v, kv_types.get(k))
        out += _pack_value(k, _STR)[1] + struct.pack("<I", vt) + payload
    offset = 0
    for name, shape, ttype, data in tensors:
        want = tensor_nbytes(ttype, shape)
        if len(data) != want:
            raise ValueError(f"{name}: {len(data)} bytes, the type and shape need {want}")
        out += _pack_value(name, _STR)[1] + struct.pack("<I", len(shape))
        out += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", ttype, offset)
        offset += -(-len(data) // alignment) * alignment
    out += b"\0" * (-len(out) % alignment)
    with open(path, "wb") as f:
        f.write(out)
        for _, _, _, data in tensors:
            f.write(data)
            f.write(b"\0" * (-len(data) % alignment))
