"""Which interchange format is this path, load it, write a model in one of them.

Loading goes one way (``tritlm.api`` -> ``tritlm.formats`` -> ``tritlm.model``): this module never
imports :mod:`tritlm.api`; the load-then-write commands (``export``, ``quantize``) live there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tritlm.errors import FormatError

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("hf", "gguf-tq2_0", "gguf-tq1_0", "gguf-i2_s", "1bit")


def detect_format(path: str | Path) -> str | None:
    """"gguf" | "1bit" | "hf" | None (tritlm's checkpoint and packed folders are detected by api.load)."""
    from tritlm.formats.gguf import is_gguf
    from tritlm.formats.hf import is_hf
    from tritlm.formats.onebit import is_onebit

    p = Path(path)
    if is_gguf(p):
        return "gguf"
    if p.is_file() and is_onebit(p):
        return "1bit"
    if is_hf(p):
        return "hf"
    return None


def load_interop(path: str | Path) -> tuple[Any, Any, str] | None:
    """(model, tokenizer, source) for a GGUF or .1bit file or a transformers folder; None otherwise."""
    fmt = detect_format(path)
    if fmt == "gguf":
        from tritlm.formats.gguf import import_gguf

        model, tok = import_gguf(path)
        return model, tok, "gguf"
    if fmt == "hf":
        from tritlm.formats.hf import import_hf

        model, tok = import_hf(path)
        return model, tok, "hf"
    if fmt == "1bit":
        from tritlm.formats.onebit import load_onebit

        model, tok = load_onebit(path)
        return model, tok, "1bit"
    return None


def load_transformer(path: str | Path) -> tuple[Any, Any, str]:
    """(Transformer in eval mode, tokenizer, source kind) from a training checkpoint, a GGUF or
    .1bit file or a transformers folder: every model whose weights tritlm can rebuild as floats."""
    from tritlm.formats.native import is_native, load_native
    from tritlm.formats.packed import is_packed

    p = Path(path)
    if not p.exists():
        raise FormatError(f"no such file or folder: {p}")
    if is_native(p):
        model, tok, _ = load_native(p)
        return model, tok, "checkpoint"
    if is_packed(p):
        raise FormatError(f"{p} is already a packed runtime folder; pack from the checkpoint or file it came from")
    got = load_interop(p)
    if got is None:
        raise FormatError(f"{p}: not a model format tritlm can read")
    return got


def read_model_config(path: str | Path):
    """The :class:`~tritlm.model.config.ModelConfig` of any model tritlm reads; checkpoints and
    packed folders are read from their ``config.json`` without loading weights."""
    from tritlm.formats.native import resolve_checkpoint
    from tritlm.formats.packed import CONFIG_FILE, is_packed
    from tritlm.model.config import ModelConfig
    from tritlm.safe_json import read_json

    p = Path(path)
    if not p.exists():
        raise FormatError(f"no such file or folder: {p}")
    try:
        if is_packed(p):
            return ModelConfig.from_dict(read_json(p / CONFIG_FILE)["model"])
        from tritlm.formats.native import is_native

        if is_native(p):
            ck = resolve_checkpoint(p)
            return ModelConfig.from_dict(read_json(ck / "config.json")["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{p}: config.json holds no valid model config ({str(e)[:100]})") from None
    return load_transformer(p)[0].cfg


def write_format(model: Any, tokenizer: Any, fmt: str, out: str | Path, *, name: str | None = None) -> Path:
    """Write a Transformer as ``fmt`` (one of :data:`EXPORT_FORMATS`); ``name`` labels log messages."""
    if fmt == "hf":
        from tritlm.formats.hf import export_hf

        return export_hf(model, tokenizer, out)
    if fmt.startswith("gguf-"):
        from tritlm.formats.gguf import export_gguf

        qtype = fmt.split("-", 1)[1].upper()
        if not model.cfg.quantised:
            qtype = "F16"
            log.warning("export: %s is full precision: linear weights written as F16", name or "the model")
        return export_gguf(model, tokenizer, out, qtype=qtype)
    if fmt == "1bit":
        from tritlm.formats.onebit import export_onebit

        return export_onebit(model, tokenizer, out)
    raise FormatError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


def write_by_suffix(model: Any, tokenizer: Any, out: str | Path) -> Path:
    """``OUT.gguf`` -> GGUF TQ2_0, ``OUT.1bit`` -> .1bit, anything else -> a transformers folder."""
    out = Path(out)
    if out.suffix == ".gguf":
        from tritlm.formats.gguf import export_gguf

        return export_gguf(model, tokenizer, out, qtype="TQ2_0")
    if out.suffix == ".1bit":
        from tritlm.formats.onebit import export_onebit

        return export_onebit(model, tokenizer, out)
    from tritlm.formats.hf import export_hf

    return export_hf(model, tokenizer, out)


def require_gguf(path: str | Path) -> None:
    """Raise :class:`FormatError` unless ``path`` is an existing GGUF file."""
    from tritlm.formats.gguf import is_gguf

    if not Path(path).exists():
        raise FormatError(f"no such file: {path}")
    if not is_gguf(path):
        raise FormatError(f"{path}: not a GGUF file (inspect/validate/repair read GGUF)")
