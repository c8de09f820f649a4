"""``.1bit``: one self-describing file for embedded use (spec: docs/onebit-format.md).

Layout (little-endian):

* 32-byte file header ``onebit_header_t``: magic "1BIT", u16 version (1), u16 flags (0), u32
  n_tensors, u32 json_len, u64 table_offset, u64 data_offset;
* ``json_len`` bytes of UTF-8 JSON at offset 32: ``{"config": ModelConfig, "tokenizer": {...}}``;
* at ``table_offset`` (8-aligned): n_tensors x 104-byte ``onebit_tensor_t``: char name[64]
  (NUL-padded), u32 dtype, u32 ndim, u32 rows, u32 cols, f32 scale, u32 crc32 (of the data bytes),
  u64 offset (from the start of the file, 64-aligned), u64 nbytes;
* tensor data. dtype 0 = F32, 1 = F16 (row-major), 2 = TERNARY2 (``kernels.pack.pack_2bit``: code
  w + 1, 4 per byte, weight 4c+i in bits 2i+1:2i, rows padded to whole bytes with code 1), 3 = BINARY1
  (``kernels.pack.pack_binary``: bit = w > 0, 8 per byte, LSB first, rows padded with 0 bits);
  weight = level * scale.

:func:`c_header` generates the matching C header; the tests compile it and read a file with it.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritlm.errors import FormatError
from tritlm.formats.common import block_linears, quantised_linear, set_quantised
from tritlm.formats.sanity import check_model_finite, check_tensor_index, state_shapes
from tritlm.io_atomic import atomic_path, write_text_atomic
from tritlm.kernels.pack import pack_2bit, pack_binary, unpack_2bit, unpack_binary
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.safe_json import loads

log = logging.getLogger(__name__)

MAGIC = b"1BIT"
VERSION = 1
HEADER = struct.Struct("<4sHHIIQQ")  # 32 bytes
ENTRY = struct.Struct("<64sIIIIfIQQ")  # 104 bytes
F32, F16, TERNARY2, BINARY1 = 0, 1, 2, 3
DTYPE_NAMES = {F32: "F32", F16: "F16", TERNARY2: "TERNARY2", BINARY1: "BINARY1"}
DATA_ALIGN = 64
assert HEADER.size == 32 and ENTRY.size == 104


def _row_bytes(dtype: int, cols: int) -> int:
    return {F32: 4 * cols, F16: 2 * cols, TERNARY2: -(-cols // 4), BINARY1: -(-cols // 8)}[dtype]


def _tokenizer_json(tok: Any) -> dict[str, Any] | None:
    if tok is None:
        return None
    if tok.kind == "byte":
        return {"kind": "byte"}
    if tok.kind == "char":
        return {"kind": "char", "chars": tok.chars}
    if tok.kind == "hf":
        return {"kind": "hf", "json": tok.tok.to_str()}
    import base64

    return {"kind": "sentencepiece", "model_b64": base64.b64encode(tok._proto).decode("ascii")}


def _tokenizer_from(d: dict[str, Any] | None):
    from tritlm.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, SentencePieceTokenizer

    if d is None:
        return None
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in ("byte", "char", "hf", "sentencepiece"):
        raise FormatError(f".1bit: unknown tokenizer kind {str(kind)[:40]!r} in the header "
                          "(byte, char, hf, sentencepiece)")
    try:
        if d["kind"] == "byte":
            return ByteTokenizer()
        if d["kind"] == "char":
            return CharTokenizer(d["chars"])
        if d["kind"] == "hf":
            from tokenizers import Tokenizer

            return HFTokenizer(Tokenizer.from_str(d["json"]))
        import base64

        return SentencePieceTokenizer(base64.b64decode(d["model_b64"]))
    except Exception as e:  # noqa: BLE001 - any corruption of the embedded tokenizer
        raise FormatError(f".1bit: the embedded tokenizer is corrupt ({str(e)[:120]})") from None


def export_onebit(model: Transformer, tokenizer: Any, path: str | Path, fp_dtype: str = "fp16",
                  c_header_path: str | Path | None = None) -> Path:
    """Write ``model`` (ternary or binary) as a .1bit file; full-precision parts in fp16 or fp32."""
    cfg = model.cfg
    check_model_finite(".1bit", model)
    if not cfg.quantised:
        raise FormatError(".1bit holds ternary or binary models; quantise it first (tritlm quantize)")
    for lname, q in cfg.layer_quants().items():
        if q.weight not in ("ternary", "binary") or q.scale != "tensor" or q != cfg.quant:
            raise FormatError(f".1bit: {lname} is {q.kind if q.quantised else 'fp'}; the format holds models whose "
                              "layers are all ternary or all binary with one scale per tensor (export GGUF instead)")
    if fp_dtype not in ("fp16", "fp32"):
        raise FormatError(f".1bit: fp_dtype must be fp16 or fp32, not {fp_dtype!r}")
    fdt = F16 if fp_dtype == "fp16" else F32
    entries: list[tuple[str, int, tuple[int, int], float, bytes]] = []
    linears = set(block_linears(cfg))
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] in linears or (k == "lm_head.weight" and cfg.tie_embeddings):
            continue
        a = v.detach().float().numpy()
        dt = fdt if a.ndim == 2 else F32  # norms stay fp32: tiny, and precision matters there
        rows, cols = (a.shape if a.ndim == 2 else (1, a.shape[0]))
        entries.append((k, dt, (rows, cols), 1.0, a.astype(np.float16 if dt == F16 else np.float32).tobytes()))
    binary = cfg.quant.weight == "binary"
    for name in block_linears(cfg):
        q, s = quantised_linear(model, name)
        qn = q.numpy()
        data = pack_binary(qn) if binary else pack_2bit(qn)
        entries.append((f"{name}.weight", BINARY1 if binary else TERNARY2, qn.shape, s, data.tobytes()))
    meta = json.dumps({"format": "tritlm-1bit", "config": cfg.to_dict(),
                       "tokenizer": _tokenizer_json(tokenizer)}).encode("utf-8")
    table_off = -(-(HEADER.size + len(meta)) // 8) * 8
    off = -(-(table_off + ENTRY.size * len(entries)) // DATA_ALIGN) * DATA_ALIGN
    data_off = off
    table = bytearray()
    for name, dt, (rows, cols), s, data in entries:
        nb = name.encode("utf-8")
        if len(nb) > 63:
            raise FormatError(f".1bit: tensor name {name} is longer than 63 bytes")
        table += ENTRY.pack(nb, dt, 2, rows, cols, s, zlib.crc32(data), off, len(data))
        off += -(-len(data) // DATA_ALIGN) * DATA_ALIGN
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, 0, len(entries), len(meta), table_off, data_off))
        f.write(meta)
        f.write(b"\0" * (table_off - HEADER.size - len(meta)))
        f.write(table)
        f.write(b"\0" * (data_off - table_off - len(table)))
        for *_, data in entries:
            f.write(data)
            f.write(b"\0" * (-len(data) % DATA_ALIGN))
    if c_header_path is not None:
        write_text_atomic(c_header_path, c_header())
    log.info("wrote %s (%d tensors, %d bytes)", path, len(entries), path.stat().st_size)
    return path


def read_onebit(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], np.ndarray]:
    """(JSON header, tensor table, file bytes) with every structural check; FormatError otherwise."""
    p = Path(path)
    if not p.is_file():  # before reading: a FIFO or a device would block or never end
        raise FormatError(f"{p} is missing or not a regular file")
    try:
        buf = np.fromfile(p, dtype=np.uint8)
    except OSError as e:
        raise FormatError(f"cannot read {p}: {e.strerror or e}") from None
    if buf.size < HEADER.size:
        raise FormatError(f"{p}: truncated .1bit file ({buf.size} bytes, the header alone is {HEADER.size})")
    magic, ver, _flags, n, jlen, toff, doff = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError(f"{p}: not a .1bit file (bad magic {magic!r})")
    if ver != VERSION:
        raise FormatError(f"{p}: unsupported .1bit version {ver} (this tritlm reads {VERSION})")
    if HEADER.size + jlen > buf.size or toff < HEADER.size + jlen or toff + n * ENTRY.size > buf.size \
            or doff < toff + n * ENTRY.size or doff > buf.size:
        raise FormatError(f"{p}: truncated or corrupt .1bit header (sections out of the file's {buf.size} bytes)")
    try:
        meta = loads(buf[HEADER.size:HEADER.size + jlen].tobytes(), f"{p}: the .1bit JSON header")
        if not isinstance(meta, dict) or meta.get("format") != "tritlm-1bit":
            raise ValueError("not a tritlm-1bit header")
    except ValueError as e:
        raise FormatError(f"{p}: corrupt .1bit JSON header ({str(e)[:100]})") from None
    table = []
    for i in range(n):
        nb, dt, nd, rows, cols, s, crc, off, nbytes = ENTRY.unpack_from(buf, toff + i * ENTRY.size)
        name = nb.rstrip(b"\0").decode("utf-8", errors="replace")
        if dt not in DTYPE_NAMES or nd not in (1, 2) or rows == 0 or cols == 0:
            raise FormatError(f"{p}: tensor #{i} ({name}) has a corrupt entry (dtype {dt}, shape {rows}x{cols})")
        if nbytes != rows * _row_bytes(dt, cols):
            raise FormatError(f"{p}: tensor {name}: {nbytes} bytes do not match {DTYPE_NAMES[dt]} {rows}x{cols}")
        if off < doff or off % DATA_ALIGN or off + nbytes > buf.size:
            raise FormatError(f"{p}: truncated .1bit file (tensor {name} at {off}+{nbytes}, file {buf.size} bytes)")
        if zlib.crc32(buf[off:off + nbytes].tobytes()) != crc:
            raise FormatError(f"{p}: tensor {name} is corrupt (CRC32 mismatch)")
        if not np.isfinite(s):
            raise FormatError(f"{p}: tensor {name} has a non-finite scale")
        table.append({"name": name, "dtype": DTYPE_NAMES[dt], "ndim": nd, "shape": (rows, cols), "scale": s,
                      "offset": off, "nbytes": nbytes})
    return meta, table, buf


def load_onebit(path: str | Path):
    """(Transformer in eval mode, tokenizer or None) from a .1bit file."""
    meta, table, buf = read_onebit(path)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except Exception as e:  # noqa: BLE001 - ConfigError/KeyError/TypeError from a corrupt header
        raise FormatError(f"{path}: invalid model config in the .1bit header ({str(e)[:120]})") from None
    # 1-D tensors are stored as one row
    want = {k: s if len(s) == 2 else (1, s[0]) for k, s in state_shapes(cfg).items()}
    check_tensor_index(str(path), cfg, {t["name"]: t["shape"] for t in table}, want)
    model = Transformer(cfg)
    by = {t["name"]: t for t in table}
    linears = set(block_linears(cfg))
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            mod = k.rsplit(".", 1)[0]
            if k == "lm_head.weight" and cfg.tie_embeddings:
                continue
            t = by.get(k)
            if t is None:
                raise FormatError(f"{path}: tensor {k} is missing")
            rows, cols = t["shape"]
            want = tuple(v.shape) if v.dim() == 2 else (1, v.shape[0])
            if (rows, cols) != want:
                raise FormatError(f"{path}: {k} has shape {(rows, cols)}, the config needs {want}")
            raw = buf[t["offset"]:t["offset"] + t["nbytes"]].reshape(rows, -1)
            if mod in linears:
                try:
                    q = unpack_binary(raw, cols) if t["dtype"] == "BINARY1" else unpack_2bit(raw, cols)
                except ValueError as e:
                    raise FormatError(f"{path}: {k}: {e}") from None
                set_quantised(model, mod, torch.from_numpy(q), float(t["scale"]))
                continue
            a = raw.view("<f2" if t["dtype"] == "F16" else "<f4").astype(np.float32)
            if not np.isfinite(a).all():
                raise FormatError(f"{path}: {k} holds NaN or infinite values")
            v.copy_(torch.from_numpy(a.reshape(v.shape)))
    model.eval()
    return model, _tokenizer_from(meta.get("tokenizer"))


def is_onebit(path: str | Path) -> bool:
    if not Path(path).is_file():  # never open a FIFO or device: the open would block
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def c_header() -> str:
    """The C header describing the file layout (C99; no allocation, no I/O)."""
    return f"""/* onebit.h - tritlm .1bit file format, version {VERSION}. Generated by tritlm.formats.onebit.
 * All integers little-endian. Spec: docs/onebit-format.md */
#ifndef TRITLM_ONEBIT_H
#define TRITLM_ONEBIT_H
#include <stdint.h>
#include <string.h>

#define ONEBIT_MAGIC "1BIT"
#define ONEBIT_VERSION {VERSION}
#define ONEBIT_DATA_ALIGN {DATA_ALIGN}

enum onebit_dtype {{
    ONEBIT_F32 = {F32}, ONEBIT_F16 = {F16}, ONEBIT_TERNARY2 = {TERNARY2}, ONEBIT_BINARY1 = {BINARY1}
}};

#pragma pack(push, 1)
typedef struct {{
    char     magic[4];      /* "1BIT" */
    uint16_t version;       /* ONEBIT_VERSION */
    uint16_t flags;         /* 0 */
    uint32_t n_tensors;
    uint32_t json_len;      /* UTF-8 JSON (model config, tokenizer) at offset 32 */
    uint64_t table_offset;  /* n_tensors x onebit_tensor_t */
    uint64_t data_offset;
}} onebit_header_t;

typedef struct {{
    char     name[64];      /* NUL-padded, e.g. "layers.0.mlp.up_proj.weight" */
    uint32_t dtype;         /* enum onebit_dtype */
    uint32_t ndim;          /* 1 or 2 (a 1-D tensor has rows = 1) */
    uint32_t rows;
    uint32_t cols;
    float    scale;         /* weight = level * scale for TERNARY2 / BINARY1; 1 otherwise */
    uint32_t crc32;         /* zlib CRC-32 of the nbytes data bytes */
    uint64_t offset;        /* from the start of the file, multiple of ONEBIT_DATA_ALIGN */
    uint64_t nbytes;        /* rows * row_bytes */
}} onebit_tensor_t;
#pragma pack(pop)

typedef char onebit_header_size_check[(sizeof(onebit_header_t) == {HEADER.size}) ? 1 : -1];
typedef char onebit_tensor_size_check[(sizeof(onebit_tensor_t) == {ENTRY.size}) ? 1 : -1];

/* Bytes of one row of `cols` weights. */
static inline uint64_t onebit_row_bytes(uint32_t dtype, uint32_t cols) {{
    switch (dtype) {{
    case ONEBIT_F32: return 4u * (uint64_t)cols;
    case ONEBIT_F16: return 2u * (uint64_t)cols;
    case ONEBIT_TERNARY2: return ((uint64_t)cols + 3u) / 4u;
    case ONEBIT_BINARY1: return ((uint64_t)cols + 7u) / 8u;
    default: return 0;
    }}
}}

/* Weight level (-1, 0, +1) at column c of a TERNARY2 row: code = w + 1 in bits 2(c%4)+1 : 2(c%4). */
static inline int onebit_ternary_at(const uint8_t *row, uint32_t c) {{
    return (int)((row[c >> 2] >> (2u * (c & 3u))) & 3u) - 1;
}}

/* Weight level (-1, +1) at column c of a BINARY1 row: bit c%8 of byte c/8 (LSB first), 1 = +1. */
static inline int onebit_binary_at(const uint8_t *row, uint32_t c) {{
    return ((row[c >> 3] >> (c & 7u)) & 1u) ? 1 : -1;
}}

/* 0 if buf (len bytes) starts with a valid header of this version. */
static inline int onebit_check_header(const void *buf, uint64_t len, onebit_header_t *out) {{
    if (len < sizeof(onebit_header_t)) return -1;
    memcpy(out, buf, sizeof(*out));
    if (memcmp(out->magic, ONEBIT_MAGIC, 4) != 0) return -2;
    if (out->version != ONEBIT_VERSION) return -3;
    if (out->table_offset + (uint64_t)out->n_tensors * sizeof(onebit_tensor_t) > len) return -4;
    return 0;
}}
#endif /* TRITLM_ONEBIT_H */
"""
