"""The evaluation command of ``tritlm``: ``eval`` (perplexity, bits per byte; lm-eval tasks).
Parse, call the library (:mod:`tritlm.eval.perplexity`, :mod:`tritlm.eval.lm_eval`), print."""

from __future__ import annotations

import argparse
import json
import sys

from tritlm.errors import ConfigError, TritlmError

EVAL_EXTRA = "--tasks needs the eval extra (pip install 'tritlm[eval]')"


def _run_tasks(a: argparse.Namespace) -> dict:
    try:
        from tritlm.eval.lm_eval import run_tasks
    except ImportError:
        raise TritlmError(EVAL_EXTRA) from None
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name (comma-separated)")
    try:
        return run_tasks(a.model, tasks, include_path=a.include_path, limit=a.limit, batch_size=1)
    except ModuleNotFoundError as e:  # the module imports lm-evaluation-harness lazily
        if (e.name or "").split(".")[0] in ("lm_eval", "tritlm"):
            raise TritlmError(EVAL_EXTRA) from None
        raise


def _progress_bar(quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(file=sys.stderr), disable=quiet or not sys.stderr.isatty(), transient=True)


def cmd_eval(a: argparse.Namespace) -> int:
    if a.tasks is None and a.data is None:
        raise ConfigError("give --data FILE (perplexity) and/or --tasks T1,T2 (lm-eval tasks)")
    if a.tasks is None and (a.include_path or a.limit is not None):
        raise ConfigError("--include-path and --limit go with --tasks")
    out: dict = {}
    if a.data is not None:
        from tritlm.eval.perplexity import evaluate

        with _progress_bar(a.json or a.quiet) as bar:
            task = bar.add_task("eval", total=None)
            res = evaluate(a.model, a.data, protocol=a.protocol, ctx=a.ctx, stride=a.stride,
                           max_tokens=a.max_tokens, batch_size=a.batch_size,
                           progress=lambda done, total: bar.update(task, completed=done, total=total))
        out = {"model": str(a.model), "data": str(a.data), **res.to_dict()}
        if not a.json:
            bpb = "n/a" if res.bits_per_byte is None else f"{res.bits_per_byte:.4f}"
            print(f"{a.model} on {a.data} ({res.protocol}, ctx {res.ctx}, stride {res.stride}): "
                  f"ppl {res.ppl:.4f}  nll {res.nll:.4f} nats/token  bits/byte {bpb}  "
                  f"({res.tokens:,} tokens scored, {res.bytes if res.bytes is not None else 'n/a'} bytes, "
                  f"{res.windows} windows)")
    if a.tasks is not None:
        results = _run_tasks(a)
        if a.json:
            out["tasks"] = results
        else:
            print(json.dumps(results, indent=2, default=str))
    if a.json:
        print(json.dumps(out, indent=2, default=str))
    return 0


def add_eval_commands(sub) -> None:
    s = sub.add_parser("eval", help="perplexity and bits per byte of any model on a text (hf, llama.cpp or chunks "
                                    "protocol); lm-eval tasks with --tasks")
    s.add_argument("model", help="checkpoint/run folder, packed folder, HF folder, GGUF file or registered name")
    s.add_argument("--data", metavar="FILE",
                   help="a text file (.txt/.raw/.gz, or a folder of them) or a `tritlm tokenize` folder (val split)")
    s.add_argument("--protocol", choices=["hf", "llama.cpp", "chunks"], default="hf",
                   help="hf: HF guide's sliding window (default); llama.cpp: llama-perplexity's chunks, second "
                        "half scored; chunks: non-overlapping chunks, all but each chunk's first token scored")
    s.add_argument("--ctx", type=int, help="window / chunk length in tokens (default: the model's context)")
    s.add_argument("--stride", type=int, help="hf protocol: tokens between window starts (default: ctx / 2)")
    s.add_argument("--max-tokens", type=int, help="evaluate the first N tokens of the data only")
    s.add_argument("--batch-size", type=int, default=1, help="windows of equal length per forward pass")
    s.add_argument("--json", action="store_true", help="print one JSON object (ppl, nll, tokens, bits_per_byte, ...)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--tasks", metavar="T1,T2", help="lm-evaluation-harness tasks (needs the eval extra)")
    s.add_argument("--include-path", metavar="DIR", help="--tasks: a folder of extra task YAML files")
    s.add_argument("--limit", type=int, help="--tasks: at most N examples per task")
    s.set_defaults(fn=cmd_eval)
