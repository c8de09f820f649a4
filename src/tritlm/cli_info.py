"""``tritlm info`` (sizes and per-layer kinds of a model or the presets) and the console / size
formatting the other commands share."""

from __future__ import annotations

import argparse
import sys


def _console():
    from rich.console import Console

    # Wide enough for the tables when stdout is not a terminal (logs, CI).
    return Console(width=None if sys.stdout.isatty() else 120)


# ---- info ----------------------------------------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> int:
    from rich.table import Table

    from tritlm.model.config import PRESETS, load_quant_spec, preset, quant_overrides_from
    from tritlm.model.sizes import kind_summary, layer_sizes, model_sizes

    con = _console()
    if a.model:
        from tritlm.formats.detect import read_model_config
        from tritlm.registry import resolve_path

        cfgs = [(str(a.model), read_model_config(resolve_path(a.model)))]
    else:
        names = [a.preset] if a.preset else list(PRESETS)
        cfgs = [(n, preset(n, **({"vocab_size": a.vocab} if a.vocab else {}))) for n in names]
    if a.quant_spec:
        spec = load_quant_spec(a.quant_spec)
        cfgs = [(n, c.replace(quant_overrides=quant_overrides_from(spec, c.quant) + c.quant_overrides))
                for n, c in cfgs]
    t = Table(title="tritlm model presets" if len(cfgs) > 1 else f"{cfgs[0][0]}")
    for col in ("model", "dim x L", "heads", "ffn", "params", "low-bit", "train*", "fp16", "packed"):
        t.add_column(col, justify="right")
    for n, cfg in cfgs:
        s = model_sizes(cfg)
        t.add_row(n, f"{cfg.dim} x {cfg.n_layers}", f"{cfg.n_heads} ({cfg.kv_heads})", str(cfg.ffn_dim),
                  _h(s.params), _h(s.ternary_params), _b(s.train_bytes), _b(s.fp16_bytes),
                  _b(s.packed_bytes))
    con.print(t)
    con.print("heads = query (key/value) heads; train* = fp32 weights + grads + AdamW moments, "
              "activations excluded; packed = block Linears at their kinds' bits (ternary 2, binary 1, "
              "int8 8, int4 4, scales included; FP layers fp16) + fp16 embeddings/norms")
    con.print(_kernel_line())
    if len(cfgs) == 1:
        cfg = cfgs[0][1]
        k = Table(title="block Linears by kind")
        for col in ("kind", "layers", "params", "bytes", "bits/weight"):
            k.add_column(col, justify="right")
        for kind, e in kind_summary(cfg).items():
            k.add_row(kind, str(e["layers"]), _h(e["params"]), _b(e["bytes"]), f"{8 * e['bytes'] / e['params']:.2f}")
        con.print(k)
        if a.layers or (cfg.quant_overrides and cfg.n_layers <= 8):
            lt = Table(title="per layer")
            for col in ("layer", "kind", "shape", "bytes"):
                lt.add_column(col, justify="right" if col == "bytes" else "left")
            shapes = cfg.linear_shapes()
            for ls in layer_sizes(cfg):
                lt.add_row(ls.name, ls.kind, "x".join(map(str, shapes[ls.name])), _b(ls.bytes))
            con.print(lt)
    return 0


def _kernel_line() -> str:
    """Which CPU kernel route runs here, and what the CPU offers (CPUID at run time)."""
    from tritlm.kernels.cpu import kernel_info

    k = kernel_info()
    if k["library"] is None:
        return f"CPU kernels: {k['backend']} (the C library is not built: {k['error'] or 'no compiler'})"
    yn = {True: "yes", False: "no", None: "?"}
    return (f"CPU kernels: {k['backend']} (this CPU: AMX-INT8 {yn[k['amx']]}, AVX-512 VNNI {yn[k['avx512_vnni']]}, "
            f"AVX2 {yn[k['avx2']]}; TRITLM_KERNEL=amx|avx512|avx2|portable|numpy picks one; amx: ternary layers' calls "
            f"of 4+ tokens on the tiles)")


def _h(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _b(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"
