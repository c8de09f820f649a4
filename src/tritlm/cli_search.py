"""`tritlm search`: the best per-layer mix of kinds that fits a size budget. Parse, call the library
(:mod:`tritlm.search`), print."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from tritlm.errors import ConfigError

BUDGET_HELP = ("size budget: packed bytes of the block Linears (levels + scales, what `tritlm pack` writes for "
               "them; embeddings, LM head and norms are NOT included), e.g. 40MB, 512KB, 1.5GB (SI: 1 MB = "
               "10^6 bytes), 300KiB / 2MiB (binary) or a byte count")


@contextmanager
def _bar(label: str, quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(file=sys.stderr), disable=quiet, transient=True) as p:
        task = p.add_task(label, total=None)
        yield lambda done, total: p.update(task, completed=done, total=total)


def _ids(path, tokenizer, limit: int | None, what: str):
    import torch

    from tritlm.eval.perplexity import read_eval_ids

    ids = read_eval_ids(path, tokenizer)
    if limit is not None:
        ids = ids[:limit]
    if ids.size < 3:
        raise ConfigError(f"{what} {path}: {ids.size} tokens are too few")
    return torch.as_tensor(ids, dtype=torch.long)


def _check_args(a: argparse.Namespace) -> tuple[int | None, list]:
    from tritlm.search.budget import budget_from_bpw, parse_budget
    from tritlm.search.units import parse_options

    budget = parse_budget(a.budget) if a.budget is not None else None
    if a.bpw is not None:
        budget_from_bpw(a.bpw, 1)  # validates the number before the model loads
    options = parse_options(a.options)
    for flag, v in (("--calib-tokens", a.calib_tokens), ("--heldout-tokens", a.heldout_tokens),
                    ("--finetune-steps", a.finetune_steps), ("--random", a.random), ("--ctx", a.ctx)):
        lo = 0 if flag in ("--finetune-steps", "--random") else 2
        if v is not None and v < lo:
            raise ConfigError(f"{flag} must be at least {lo}, got {v}")
    if a.finetune_steps and not a.finetune_out:
        raise ConfigError("--finetune-steps needs --finetune-out DIR (the fine-tune's run folder)")
    return budget, options


def cmd_search(a: argparse.Namespace) -> int:
    budget, options = _check_args(a)
    import torch

    from tritlm.data.corpus import default_corpus_path
    from tritlm.formats.detect import load_transformer
    from tritlm.search.budget import budget_from_bpw, format_bytes
    from tritlm.search.knapsack import min_bytes
    from tritlm.search.plan import Problem, choose, evaluate_pick
    from tritlm.search.sensitivity import calib_loss, fisher_sensitivity, measured_sensitivity
    from tritlm.search.units import block_params, make_units, size_table

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, _ = load_transformer(a.model)
    model = model.float().eval()
    if tok is None:
        raise ConfigError(f"{a.model} has no tokenizer: the calibration text cannot be encoded")
    cfg = model.cfg
    units = make_units(cfg, a.units)
    if budget is None:
        budget = budget_from_bpw(a.bpw, block_params(cfg))
    sizes = size_table(cfg, units, options)
    if min_bytes(sizes) > budget:
        raise ConfigError(f"budget {format_bytes(budget)} ({budget:,} bytes) is smaller than the smallest "
                          f"configuration ({min_bytes(sizes):,} bytes)")
    ctx = min(a.ctx or 256, cfg.max_seq_len)
    calib_ids = _ids(a.calib or default_corpus_path(), tok, a.calib_tokens, "--calib")
    held_ids = _ids(a.heldout, tok, a.heldout_tokens, "--heldout") if a.heldout else None
    ctx = min(ctx, calib_ids.numel() - 1)
    calib = lambda m: calib_loss(m, calib_ids, ctx)  # noqa: E731
    held = (lambda m: calib_loss(m, held_ids, ctx)) if held_ids is not None else None  # noqa: E731
    quiet = a.quiet or a.json
    with _bar(f"sensitivity ({a.sensitivity})", quiet) as progress:
        fn = measured_sensitivity if a.sensitivity == "measured" else fisher_sensitivity
        sens = fn(model, calib_ids, units, options, ctx, progress=progress)
    problem = Problem(tuple(units), tuple(options), sizes, sens)
    dp, greedy = choose(problem, budget)
    outs = [evaluate_pick(problem, model, name, p, calib, held) for name, p in (("dp", dp), ("greedy", greedy))]
    base_held = held(problem.model(model, [None] * len(units))) if held else None
    result = {"model": str(a.model), "budget": budget, "units": a.units, "options": [o.name for o in options],
              "sensitivity": sens.method, "base_loss": sens.base_loss, "base_heldout": base_held,
              "block_params": block_params(cfg), "ctx": ctx, "calib_tokens": int(calib_ids.numel()),
              "picks": {o.method: {"bytes": o.pick.bytes, "bpw": 8 * o.pick.bytes / block_params(cfg),
                                   "exact": o.pick.exact, "predicted": o.predicted, "measured": o.measured,
                                   "heldout": o.heldout, "choice": dict(zip((u.name for u in units),
                                                                            problem.labels(o.pick.picks)))}
                        for o in outs}}
    if a.out:
        from tritlm.search.spec import spec_dict, write_spec

        header = [f"tritlm search {a.model}: budget {budget:,} bytes of packed block Linears (scales included)",
                  f"units {a.units}, {sens.method} sensitivity; packed bytes {dp.bytes:,}; predicted loss "
                  f"{outs[0].predicted:.4f}, measured {outs[0].measured:.4f} (calibration, nats/token)"]
        result["spec"] = str(write_spec(a.out, spec_dict(units, options, dp.picks), header))
    if a.pareto:
        from tritlm.search.pareto import budget_grid, pareto_points, write_pareto

        with _bar("pareto", quiet) as progress:
            pts = pareto_points(problem, model, budget_grid(problem) + [budget], held or calib, n_random=a.random,
                                progress=progress)
        paths = write_pareto(pts, a.pareto, title=f"{Path(a.model).name}: searched vs uniform vs random",
                             loss_name="held-out loss" if held else "calibration loss")
        result["pareto"] = {k: str(v) for k, v in paths.items()}
    if a.finetune_steps:
        result["finetune"] = _finetune(a, problem, dp.picks, calib, held)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result, problem, outs)
    return 0


def _finetune(a: argparse.Namespace, problem, picks, calib, held) -> dict:
    from tritlm.cli import _Progress
    from tritlm.cli_finetune import FINETUNE_DEFAULTS
    from tritlm.search.finetune import finetune_config, run_finetune
    from tritlm.search.spec import spec_dict

    spec = spec_dict(problem.units, problem.options, picks)
    cfg = finetune_config(a.model, spec, a.finetune_steps, a.finetune_out, a.finetune_data or a.calib,
                          FINETUNE_DEFAULTS, a.set)
    r, model = run_finetune(cfg, _Progress("finetune", quiet=a.quiet or a.json))
    return {"steps": r.steps, "checkpoint": str(r.checkpoint), "measured": calib(model),
            "heldout": held(model) if held else None}


def _print(result: dict, problem, outs) -> None:
    from rich.table import Table

    from tritlm.cli_info import _console
    from tritlm.search.budget import format_bytes

    con = _console()
    t = Table(title="chosen kind per unit (exact knapsack)")
    for col in ("unit", "kind", "bytes", "loss increase alone"):
        t.add_column(col, justify="right" if col != "unit" and col != "kind" else "left")
    dp = outs[0].pick
    for i, (u, j) in enumerate(zip(problem.units, dp.picks)):
        t.add_row(u.name, problem.options[j].name, f"{int(problem.sizes[i, j]):,}",
                  f"{problem.sens.delta[i, j]:+.4f}")
    con.print(t)
    s = Table(title=f"tritlm search: budget {format_bytes(result['budget'])}", show_header=True)
    for col in ("pick", "bytes", "bits/weight", "predicted", "measured (calib)", "held-out"):
        s.add_column(col, justify="left" if col == "pick" else "right")
    s.add_row("full precision", "", "", f"{result['base_loss']:.4f}", f"{result['base_loss']:.4f}",
              "" if result["base_heldout"] is None else f"{result['base_heldout']:.4f}")
    for o in outs:
        d = result["picks"][o.method]
        s.add_row("knapsack (DP)" + ("" if o.pick.exact else ", bucketed") if o.method == "dp" else "greedy",
                  f"{o.pick.bytes:,}", f"{d['bpw']:.3f}", f"{o.predicted:.4f}", f"{o.measured:.4f}",
                  "" if o.heldout is None else f"{o.heldout:.4f}")
    if "finetune" in result:
        f = result["finetune"]
        s.add_row(f"DP + fine-tune {f['steps']} steps", f"{outs[0].pick.bytes:,}", "", "", f"{f['measured']:.4f}",
                  "" if f["heldout"] is None else f"{f['heldout']:.4f}")
    con.print(s)
    con.print("losses: nats per token, non-overlapping windows of "
              f"{result['ctx']} tokens; predicted = full-precision loss + the sum of each unit's increase alone")
    for k in ("spec", "pareto"):
        if k in result:
            con.print(f"{k}: {result[k]}")


def add_search_command(sub) -> None:
    s = sub.add_parser(
        "search", help="per-layer kinds under a size budget: sensitivity per unit, exact knapsack, a spec file",
        description="Measure how much the calibration loss rises when each unit (a block Linear or a group) "
                    "alone is quantised to each option (the others at full precision), choose one option per "
                    "unit with an exact multiple-choice knapsack over the real packed bytes (and a greedy "
                    "loss-per-byte baseline), measure the chosen mix for real and write a --quant-spec file for "
                    "`tritlm pack / export / finetune`.")
    s.add_argument("model", help="a transformers folder, tritlm checkpoint, GGUF or .1bit file")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", metavar="SIZE", help=BUDGET_HELP)
    g.add_argument("--bpw", type=float, metavar="BITS",
                   help="budget in bits per block-Linear weight, scales and padding included (e.g. 2.5)")
    s.add_argument("--options", default="binary,ternary,int4,int8,fp16",
                   help="kinds a unit may take (default: binary,ternary,int4,int8,fp16; also ternary-ch, "
                        "binary-ch, int4-g32, int4-g128). Ternary is costed in pack's default 2-bit layout")
    s.add_argument("--units", choices=["linear", "qkv", "block"], default="linear",
                   help="linear: each block Linear (default); qkv: q/k/v together, gate/up together, o and "
                        "down alone; block: each layer's seven Linears together")
    s.add_argument("--calib", metavar="FILE", help="calibration text (default: the bundled Tiny Shakespeare)")
    s.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens used (default 8192)")
    s.add_argument("--heldout", metavar="FILE",
                   help="held-out text: the picks (and the Pareto points) are measured on it too")
    s.add_argument("--heldout-tokens", type=int, default=16384, help="held-out tokens used (default 16384)")
    s.add_argument("--ctx", type=int, help="window length of the loss (default: min(256, the model's context))")
    s.add_argument("--sensitivity", choices=["measured", "fisher"], default="measured",
                   help="measured: quantise each unit in each option and evaluate (default); fisher: HAWQ-style "
                        "0.5 * sum(Fisher * dW^2) from one backward pass per window (cheaper, approximate)")
    s.add_argument("--out", metavar="SPEC.yaml", help="write the chosen mix as a --quant-spec file")
    s.add_argument("--pareto", metavar="DIR", help="also measure searched mixes at several budgets, every uniform "
                                                   "kind and random mixes of the same size: pareto.md/.csv/.png")
    s.add_argument("--random", type=int, default=3, help="--pareto: random mixes per budget (default 3)")
    s.add_argument("--finetune-steps", type=int, default=0,
                   help="then fine-tune the chosen mix for N steps with `tritlm finetune`'s recipe (distilled "
                        "from MODEL) and measure it again")
    s.add_argument("--finetune-out", metavar="DIR", help="run folder of the fine-tune")
    s.add_argument("--finetune-data", metavar="FILE", help="fine-tuning corpus (default: --calib)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a fine-tuning config key, e.g. --set optim.lr=5e-4 (repeatable)")
    s.add_argument("--threads", type=int, help="CPU threads for torch")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_search)
