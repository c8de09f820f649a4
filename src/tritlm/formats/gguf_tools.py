"""inspect / validate / repair for GGUF files (ours and other tools')."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritlm.errors import FormatError, TritlmError
from tritlm.formats.gguf_io import GGUFFile, read_gguf, write_gguf
from tritlm.io_atomic import atomic_path

log = logging.getLogger(__name__)


def _short(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return f"[{v.dtype} x {len(v)}]"
    if isinstance(v, list):
        return f"[{len(v)} items]" if len(v) > 8 else v
    if isinstance(v, str) and len(v) > 200:
        return v[:120] + f"... ({len(v)} chars)"
    return v


def _linear_kinds(f: GGUFFile) -> dict[str, dict[str, int]] | None:
    """``{tritlm kind: {GGUF type: tensors}}`` of the block Linears of a file with a ``tritlm.config``
    (mixed models: e.g. ``{"ternary": {"TQ2_0": 10}, "int8": {"Q8_0": 8}, "fp": {"F16": 2}}``)."""
    from tritlm.formats.gguf import gguf_name
    from tritlm.model.config import ModelConfig

    try:
        cfg = ModelConfig.from_dict(json.loads(f.kv["tritlm.config"]))
    except Exception:  # noqa: BLE001 - absent or unreadable: a foreign file, nothing to say
        return None
    types = {t.name: t.type_name for t in f.tensors}
    out: dict[str, dict[str, int]] = {}
    for name, q in cfg.layer_quants().items():
        d = out.setdefault(q.kind, {})
        ty = types.get(gguf_name(name + ".weight"), "missing")
        d[ty] = d.get(ty, 0) + 1
    return out


def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """Version, metadata (long arrays summarised), tensors (name, shape, type, bytes), totals per
    GGUF type and, for our files, the GGUF types of the block Linears by tritlm kind (``linear_kinds``)."""
    f = read_gguf(path, strict=False)
    tensors = [{"name": t.name, "shape": list(t.shape), "type": t.type_name, "bytes": t.nbytes,
                "offset": t.offset} for t in f.tensors]
    by_type: dict[str, dict[str, int]] = {}
    for t in f.tensors:
        d = by_type.setdefault(t.type_name, {"tensors": 0, "weights": 0, "bytes": 0})
        d["tensors"] += 1
        d["weights"] += int(np.prod(t.shape))
        d["bytes"] += t.nbytes
    for d in by_type.values():
        d["bits_per_weight"] = round(8 * d["bytes"] / max(d["weights"], 1), 4)
    return {"path": str(f.path), "version": f.version, "alignment": f.alignment, "file_size": f.file_size,
            "data_offset": f.data_offset, "metadata": {k: _short(v) for k, v in f.kv.items()},
            "tensors": tensors, "by_type": by_type, "linear_kinds": _linear_kinds(f),
            "problems": list(f.problems)}


def validate_gguf(path: str | Path, forward: bool = True) -> dict[str, Any]:
    """Structure, alignment, shapes against the architecture, finite values and a short forward pass.

    Returns ``{"ok": bool, "checks": [...passed...], "problems": [...]}``; never raises on a bad file.
    """
    checks: list[str] = []
    problems: list[str] = []
    try:
        f = read_gguf(path, strict=False)
    except FormatError as e:
        return {"ok": False, "checks": checks, "problems": [str(e)]}
    # v1 and v2 are valid files (read like v3); repair can still rewrite them as v3
    note = "" if f.version == 3 else " (older than v3: valid; tritlm repair rewrites it as v3)"
    checks.append(f"GGUF v{f.version}, {len(f.tensors)} tensors, {len(f.kv)} metadata keys{note}")
    problems += f.problems
    if not f.problems:
        checks.append(f"all tensor offsets aligned to {f.alignment}")
    end = max((f.data_offset + t.offset + t.nbytes for t in f.tensors), default=f.data_offset)
    if end > f.file_size:
        problems.append("tensor data runs past the end of the file")
    else:
        checks.append("every tensor lies inside the file")
    from tritlm.formats.gguf import config_from_gguf, dequantize_tensor, import_gguf
    from tritlm.formats.gguf_tokenizer import tokenizer_from_kv

    try:  # the declared model against the tensor table: nothing is built before this passes
        cfg = config_from_gguf(f)
        checks.append(f"architecture {f.kv['general.architecture']}: {cfg.n_layers} layers, dim {cfg.dim}, "
                      "every tensor the metadata implies present with its shape")
    except TritlmError as e:
        problems.append(str(e))
        return {"ok": False, "checks": checks, "problems": problems}
    try:
        tok = tokenizer_from_kv(f.kv)
        checks.append(f"tokenizer: {tok.kind}" if tok is not None else "no tritlm tokenizer (model only)")
    except TritlmError as e:
        problems.append(str(e))
    bad = []
    for t in f.tensors:
        try:
            if not np.isfinite(dequantize_tensor(f, t)).all():
                bad.append(t.name)
        except TritlmError as e:
            problems.append(str(e))
    if bad:
        problems.append(f"non-finite values in {', '.join(bad[:5])}")
    else:
        checks.append("all values finite")
    if forward and not problems:
        try:
            model, _ = import_gguf(path)
            ids = torch.arange(min(8, model.cfg.max_seq_len)).remainder(model.cfg.vocab_size)[None]
            with torch.no_grad():
                logits, _ = model(ids)
            if torch.isfinite(logits).all():
                checks.append(f"forward pass over {ids.shape[1]} tokens gives finite logits")
            else:
                problems.append("forward pass gives non-finite logits")
        except TritlmError as e:
            problems.append(str(e))
    return {"ok": not problems, "checks": checks, "problems": problems}


def repair_gguf(src: str | Path, out: str | Path) -> dict[str, Any]:
    """Rewrite a readable GGUF (v1/v2, misaligned offsets, any alignment) as a clean, aligned v3 file,
    keeping every metadata key with its value type and every tensor's bytes."""
    f: GGUFFile = read_gguf(src, strict=False)
    kv = {k: v for k, v in f.kv.items() if k != "general.alignment"}
    types = {k: t for k, t in f.kv_types.items() if k in kv}
    tensors = [(t.name, t.shape, t.ttype, f.tensor_bytes(t).tobytes()) for t in f.tensors]
    with atomic_path(out) as tmp:
        write_gguf(tmp, kv, tensors, kv_types=types)
    read_gguf(out)  # the result must pass the strict reader
    fixed = list(f.problems) + ([f"version {f.version} -> 3"] if f.version != 3 else [])
    log.info("repaired %s -> %s (%s)", src, out, "; ".join(fixed) or "rewritten")
    return {"src": str(src), "out": str(out), "fixed": fixed}
