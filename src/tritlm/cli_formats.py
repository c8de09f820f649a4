"""The interchange-format commands of ``tritlm``: ``quantize``, ``export``, ``inspect``, ``validate``,
``repair``. Parse, call the library (:mod:`tritlm.api`, :mod:`tritlm.formats`), print."""

from __future__ import annotations

import argparse
import json

from tritlm.formats.detect import EXPORT_FORMATS


def cmd_export(a: argparse.Namespace) -> int:
    from tritlm.api import export_model

    out = export_model(a.model, a.format, a.out, overwrite=a.force)
    print(f"wrote {out}")
    return 0


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
