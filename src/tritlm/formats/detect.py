"""Which format is this path, load it, and the CLI commands of the interchange formats
(``export``, ``quantize``, ``inspect``, ``validate``, ``repair``)."""

from __future__ import annotations

import argparse
import json
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


def export_model(src: str | Path, fmt: str, out: str | Path) -> Path:
    """Load any model tritlm reads as a Transformer and write it as ``fmt``."""
    from tritlm.api import load

    m = load(src)
    if m.engine is not None:
        raise FormatError(f"{src} is a packed runtime folder; export from the training checkpoint instead")
    if fmt == "hf":
        from tritlm.formats.hf import export_hf

        return export_hf(m.model, m.tokenizer, out)
    if fmt.startswith("gguf-"):
        from tritlm.formats.gguf import export_gguf

        qtype = fmt.split("-", 1)[1].upper()
        if not m.model.cfg.quantised:
            qtype = "F16"
            log.warning("export: %s is full precision: linear weights written as F16", src)
        return export_gguf(m.model, m.tokenizer, out, qtype=qtype)
    if fmt == "1bit":
        from tritlm.formats.onebit import export_onebit

        return export_onebit(m.model, m.tokenizer, out)
    raise FormatError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")


# ---- CLI ----------------------------------------------------------------------------------------
def _need_gguf(path: str) -> None:
    from tritlm.formats.gguf import is_gguf

    if not Path(path).exists():
        raise FormatError(f"no such file: {path}")
    if not is_gguf(path):
        raise FormatError(f"{path}: not a GGUF file (inspect/validate/repair read GGUF)")


def cmd_export(a: argparse.Namespace) -> int:
    out = export_model(a.model, a.format, a.out)
    print(f"wrote {out}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from tritlm.formats.gguf_tools import inspect_gguf

    _need_gguf(a.file)
    info = inspect_gguf(a.file)
    if not a.all:
        info["tensors"] = info["tensors"][:12] + ([f"... {len(info['tensors']) - 12} more"]
                                                   if len(info["tensors"]) > 12 else [])
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from tritlm.formats.gguf_tools import validate_gguf

    _need_gguf(a.file)
    rep = validate_gguf(a.file, forward=not a.no_forward)
    for c in rep["checks"]:
        print(f"ok    {c}")
    for pr in rep["problems"]:
        print(f"FAIL  {pr}")
    return 0 if rep["ok"] else 1


def cmd_repair(a: argparse.Namespace) -> int:
    from tritlm.formats.gguf_tools import repair_gguf

    _need_gguf(a.file)
    rep = repair_gguf(a.file, a.out)
    print(f"wrote {rep['out']}" + (f" (fixed: {'; '.join(rep['fixed'])})" if rep["fixed"] else ""))
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from tritlm.api import load
    from tritlm.formats.ptq import perplexity, quantize_model

    m = load(a.src)
    if m.engine is not None:
        raise FormatError(f"{a.src} is a packed runtime folder (already ternary)")
    q = quantize_model(m.model, a.bits)
    if a.eval:
        from tritlm.data.corpus import read_corpus

        ids = m.tokenizer.encode(read_corpus(a.eval))
        before, after = perplexity(m.model, ids, 64), perplexity(q, ids, 64)
        print(f"perplexity on {a.eval}: {before:.3f} (fp) -> {after:.3f} ({a.bits}, x{after / before:.2f})")
    out = Path(a.out)
    if out.suffix == ".gguf":
        from tritlm.formats.gguf import export_gguf

        export_gguf(q, m.tokenizer, out, qtype="TQ2_0")
    elif out.suffix == ".1bit":
        from tritlm.formats.onebit import export_onebit

        export_onebit(q, m.tokenizer, out)
    else:
        from tritlm.formats.hf import export_hf

        export_hf(q, m.tokenizer, out)
    print(f"wrote {out}")
    return 0


def add_format_commands(sub) -> None:
    s = sub.add_parser("quantize", help="post-training quantisation (absmean) of a full-precision model")
    s.add_argument("src", help="checkpoint/run folder, HF Llama folder, GGUF file or registered model name")
    s.add_argument("out", help="OUT.gguf (TQ2_0), OUT.1bit, or a folder (transformers BitNet/Llama)")
    s.add_argument("--bits", choices=["ternary", "binary"], default="ternary")
    s.add_argument("--eval", metavar="TEXT", help="held-out text file: print perplexity before and after")
    s.set_defaults(fn=cmd_quantize)
    s = sub.add_parser("export", help="write a model as a transformers folder, a GGUF file or a .1bit file")
    s.add_argument("model", help="checkpoint/run folder, HF folder, GGUF file or registered model name")
    s.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    s.add_argument("out", help="output folder (hf) or file (gguf), written atomically")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("inspect", help="a GGUF file's metadata, tensors, types and sizes (JSON)")
    s.add_argument("file")
    s.add_argument("--all", action="store_true", help="list every tensor")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("validate", help="check a GGUF file: structure, alignment, shapes, values, a forward pass")
    s.add_argument("file")
    s.add_argument("--no-forward", action="store_true", help="skip the forward pass")
    s.set_defaults(fn=cmd_validate)
    s = sub.add_parser("repair", help="rewrite a readable but misaligned or older GGUF as a clean v3 file")
    s.add_argument("file")
    s.add_argument("out")
    s.set_defaults(fn=cmd_repair)
