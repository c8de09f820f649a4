"""The interchange-format commands of ``tritlm``: ``quantize``, ``export``, ``inspect``, ``validate``,
``repair``. Parse, call the library (:mod:`tritlm.api`, :mod:`tritlm.formats`), print."""

from __future__ import annotations

import argparse
import json

from tritlm.formats.detect import EXPORT_FORMATS


def cmd_export(a: argparse.Namespace) -> int:
    from pathlib import Path

    from tritlm.api import export_model
    from tritlm.errors import ConfigError

    if a.c_header is not None:
        if a.format != "1bit":
            raise ConfigError(f"--c-header goes with --format 1bit (the header describes .1bit files), not {a.format}")
        if Path(a.c_header).exists() and not a.force:
            raise ConfigError(f"{a.c_header} exists; choose another --c-header file or pass --force to replace it")
    out = export_model(a.model, a.format, a.out, overwrite=a.force)
    print(f"wrote {out}{_f16_note(out) if a.format.startswith('gguf-') else ''}")
    if a.c_header is not None:
        from tritlm.formats.onebit import c_header
        from tritlm.io_atomic import write_text_atomic

        write_text_atomic(a.c_header, c_header())
        print(f"wrote {a.c_header} (C header of the .1bit layout)")
    return 0


def _f16_note(path) -> str:
    """Block Linears the GGUF writer had to store as F16 (rows that are not whole blocks)."""
    from tritlm.formats.gguf_io import read_gguf

    f = read_gguf(path)
    fallback = f.kv.get("tritlm.fallback_f16") or []
    if not fallback:
        return ""
    total = sum(1 for t in f.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return (f" ({len(fallback)} of {total} block Linears stored as F16: rows not a multiple of the "
            f"{f.kv.get('tritlm.qtype')} block; see the warning above)")


def cmd_inspect(a: argparse.Namespace) -> int:
    from tritlm.formats.detect import require_gguf
    from tritlm.formats.gguf_tools import inspect_gguf
    from tritlm.formats.packed import inspect_packed, is_packed

    if is_packed(a.file):
        info = inspect_packed(a.file)
        if not a.all:
            names = list(info["tensors"])
            info["tensors"] = {n: info["tensors"][n] for n in names[:12]}
            if len(names) > 12:
                info["tensors"][f"... {len(names) - 12} more"] = None
        print(json.dumps(info, indent=2, default=str))
        return 0
    require_gguf(a.file)
    info = inspect_gguf(a.file)
    if not a.all:
        info["tensors"] = info["tensors"][:12] + ([f"... {len(info['tensors']) - 12} more"]
                                                   if len(info["tensors"]) > 12 else [])
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from tritlm.formats.detect import require_gguf
    from tritlm.formats.gguf_tools import validate_gguf

    require_gguf(a.file)
    rep = validate_gguf(a.file, forward=not a.no_forward)
    for c in rep["checks"]:
        print(f"ok    {c}")
    for pr in rep["problems"]:
        print(f"FAIL  {pr}")
    return 0 if rep["ok"] else 1


def cmd_repair(a: argparse.Namespace) -> int:
    from tritlm.formats.detect import require_gguf
    from tritlm.formats.gguf_tools import repair_gguf

    require_gguf(a.file)
    rep = repair_gguf(a.file, a.out)
    print(f"wrote {rep['out']}" + (f" (fixed: {'; '.join(rep['fixed'])})" if rep["fixed"] else ""))
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from tritlm.api import quantize

    r = quantize(a.src, a.out, bits=a.bits, eval_text=a.eval)
    if r.ppl_before is not None and r.ppl_after is not None:
        print(f"perplexity on {a.eval}: {r.ppl_before:.3f} (fp) -> {r.ppl_after:.3f} "
              f"({a.bits}, x{r.ppl_after / r.ppl_before:.2f})")
    print(f"wrote {r.out}")
    return 0


def add_format_commands(sub) -> None:
    s = sub.add_parser("quantize", help="post-training quantisation (absmean) of a full-precision model")
    s.add_argument("src", help="checkpoint/run folder, HF Llama folder, GGUF file or registered model name")
    s.add_argument("out", help="OUT.gguf (TQ2_0), OUT.1bit, or a folder (transformers BitNet/Llama)")
    s.add_argument("--bits", choices=["ternary", "binary", "int8", "int4"], default="ternary")
    s.add_argument("--eval", metavar="TEXT", help="held-out text file: print perplexity before and after")
    s.set_defaults(fn=cmd_quantize)
    s = sub.add_parser("export", help="write a model as a transformers folder, a GGUF file or a .1bit file")
    s.add_argument("model", help="checkpoint/run folder, HF folder, GGUF file or registered model name")
    s.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    s.add_argument("out", help="output folder (hf) or file (gguf), written atomically")
    s.add_argument("--force", action="store_true", help="replace an existing output")
    s.add_argument("--c-header", metavar="FILE.h", help="with --format 1bit: also write the C header of the "
                                                         "format (onebit.h) to FILE.h")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("inspect", help="a GGUF file or packed folder: metadata, tensors, kinds, types and sizes (JSON)")
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
