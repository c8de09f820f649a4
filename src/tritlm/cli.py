"""The ``tritlm`` command: parse, call the library, print. Every command has a Python-API twin."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tritlm.cli_info import _console, _h, cmd_info
from tritlm.cli_progress import Progress as _Progress
from tritlm.cli_sampling import add_sampling_args, sampling_kwargs, sampling_params
from tritlm.errors import ConfigError, TritlmError

log = logging.getLogger("tritlm")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the model runs (default auto: CUDA when torch sees a GPU; a packed model on CUDA "
                        "runs the Triton kernels)")


def add_kv_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-dtype", choices=["auto", "f16", "q8", "f32"], default="auto",
                   help="packed models' KV cache (auto: f16 on the CPU, half the memory of f32 and faster "
                        "attention; q8: int8 with a scale per head row, half f16's bytes again, CPU only, "
                        "as llama.cpp's q8_0 cache; f32: keys and values exact)")


def require_int(flag: str, v: int | None, lo: int, hi: int | None = None, note: str = "") -> None:
    """A command-line integer out of range is a one-line :class:`ConfigError` naming the flag."""
    if v is None or (v >= lo and (hi is None or v <= hi)):
        return
    rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
    raise ConfigError(f"{flag} {v} must be {rng}" + (f" ({note})" if note else ""))


def require_tokenizer(m, command: str) -> None:
    """A model loaded without a tokenizer (a transformers folder or GGUF file that carries none)
    cannot take text: a one-line error instead of an AttributeError later."""
    if m.tokenizer is None:
        raise TritlmError(f"{m.path} has no tokenizer, and {command} needs one to turn text into tokens "
                          "(export the model with its tokenizer, or use a checkpoint / packed folder)")


def _lr_list(flag: str, text: str) -> list[float]:
    """A comma-separated LR sweep; every entry a finite number > 0, or a one-line error."""
    import math

    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not a list of numbers (comma-separated)") from None
    if not lrs or any(not math.isfinite(x) or x <= 0 for x in lrs):
        raise ConfigError(f"{flag} {text!r}: every learning rate must be a finite number > 0")
    return lrs


# ---- tokenize ------------------------------------------------------------------------------------
def cmd_tokenize(a: argparse.Namespace) -> int:
    from tritlm.data import prepare_dataset

    meta = prepare_dataset(a.corpus, a.out, tokenizer=a.tokenizer, val_fraction=a.val_fraction)
    _console().print(f"[green]tokenised[/] {a.corpus} -> {a.out}: {meta.n_train:,} train + "
                     f"{meta.n_val:,} val tokens, vocab {meta.vocab_size} ({meta.tokenizer_kind})")
    return 0


# ---- train ---------------------------------------------------------------------------------------
def _train_config(a: argparse.Namespace, base: dict | None = None, **extra):
    """The TrainConfig of `train` / `finetune`: ``base`` defaults, then --config, --set, the flags."""
    from tritlm.train.config import load_config

    direct = {"preset": getattr(a, "preset", None), "max_steps": a.max_steps, "out_dir": a.out, "optim.lr": a.lr,
              "batch_size": a.batch_size, "block_size": a.block_size, "data.corpus": a.data,
              "data.dataset_dir": a.dataset, "data.tokenizer": getattr(a, "tokenizer", None),
              "threads": a.threads, "device": a.device, "seed": a.seed, "eval_interval": a.eval_interval,
              **extra}
    if getattr(a, "fp", False):
        direct["fp"] = True
    if getattr(a, "fsdp", False):
        direct["fsdp"] = True
    if a.quant_spec:
        from tritlm.model.config import load_quant_spec

        direct["model.quant_overrides"] = load_quant_spec(a.quant_spec)
    return load_config(a.config, a.set, base=base, **direct)


def _summary_table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table

    t = Table(title=title, show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    return t


def _result_rows(r) -> list[tuple[str, str]]:
    kind = r.model_config.quant.weight
    return [("model", f"{kind}, {r.model_config.n_layers}x{r.model_config.dim}, {_h(r.params)} params"),
            ("steps", str(r.steps)), ("train loss", f"{r.train_loss:.4f}"),
            ("val loss (full split)", f"{r.val_loss:.4f}"),
            ("throughput", f"{r.tokens_per_s:,.0f} tok/s, {r.step_ms:.1f} ms/step, MFU {r.mfu:.1%}"),
            ("rollbacks", str(r.rollbacks)), ("checkpoint", str(r.checkpoint))]


def cmd_train(a: argparse.Namespace) -> int:
    cfg = _train_config(a)  # a bad value fails here, before torch is imported
    from tritlm.train.trainer import Trainer

    rank0 = int(os.environ.get("RANK", "0")) == 0
    prog = _Progress("train", quiet=a.quiet or not rank0)
    r = Trainer(cfg, prog).run(resume=a.resume)
    if rank0:
        _console().print(_summary_table("training summary", _result_rows(r)))
    return 0


# ---- compare -------------------------------------------------------------------------------------
def cmd_compare(a: argparse.Namespace) -> int:
    lrs = _lr_list("--lrs", a.lrs) if a.lrs else None
    cfg = _train_config(a)
    from tritlm.eval.compare import compare

    variants, variant_lrs = None, None
    if a.equal_bytes or a.wide_ternary:
        from tritlm.data import TokenData, default_corpus_path, prepare_dataset
        from tritlm.eval.compare import equal_bytes_fp_model, wide_ternary_model

        ddir = Path(cfg.data.dataset_dir or Path(a.out) / "data")
        if not cfg.data.dataset_dir:
            prepare_dataset(cfg.data.corpus or default_corpus_path(), ddir, tokenizer=cfg.data.tokenizer,
                            val_fraction=cfg.data.val_fraction)
        cfg.data.dataset_dir = str(ddir)
        vocab = TokenData(ddir).vocab_size
        variants = {"ternary": {"fp": False}, "fp": {"fp": True}}
        if a.equal_bytes:
            small = equal_bytes_fp_model(cfg, vocab)
            variants["fp-equal-bytes"] = {"fp": True, "model": {**cfg.model, **small}}
        if a.wide_ternary:
            wide = wide_ternary_model(cfg, vocab)
            variants["ternary-wide"] = {"fp": False, "model": {**cfg.model, **wide}}
    if a.variant_lrs:
        variant_lrs = {}
        for spec in a.variant_lrs:
            name, _, vals = spec.partition("=")
            if name not in (variants or {"ternary": 0, "fp": 0}) or not vals:
                raise TritlmError(f"--variant-lrs {spec!r}: expected NAME=LR[,LR...] with NAME one of "
                                  f"{', '.join(variants or ['ternary', 'fp'])}")
            variant_lrs[name] = _lr_list("--variant-lrs", vals)
    seeds = None
    if a.seeds is not None:
        require_int("--seeds", a.seeds, 1, 100)
        seeds = [cfg.seed + i for i in range(a.seeds)]
    res = compare(cfg, lrs=lrs, out_dir=Path(a.out), variants=variants,
                  callback_factory=lambda label: _Progress(label, a.quiet), variant_lrs=variant_lrs, seeds=seeds)
    _console().print(res.table_markdown())
    _console().print(f"plot: {res.plot_path}\ntable: {res.table_path}")
    return 0


# ---- generate ------------------------------------------------------------------------------------
def cmd_generate(a: argparse.Namespace) -> int:
    require_int("--max-tokens", a.max_tokens, 1)
    import tritlm
    from tritlm.heap import freeze_startup_heap

    kw = sampling_kwargs(a)
    sampling_params(**kw)  # checked before the model loads: a bad flag fails at once
    require_int("--draft-k", a.draft_k, 1)
    m = tritlm.load(a.model, a.device, a.kv_dtype)
    require_tokenizer(m, "generate")
    draft = tritlm.load(a.draft, a.device, a.kv_dtype) if a.draft else None
    freeze_startup_heap()  # no full collection pausing the stream
    if not m.tokenizer.encode(a.prompt):
        raise TritlmError("the prompt encodes to no tokens")
    sys.stdout.write(a.prompt)
    for text in m.stream(a.prompt, a.max_tokens, draft=draft, draft_k=a.draft_k, penalty_alpha=a.penalty_alpha, **kw):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# ---- demo ----------------------------------------------------------------------------------------
def cmd_demo(a: argparse.Namespace) -> int:
    """Train the tiny ternary model on the bundled Tiny Shakespeare, pack it, generate from it."""
    require_int("--steps", a.steps, 1)
    import shutil
    import time

    import tritlm
    from tritlm.train.config import load_config
    from tritlm.train.trainer import Trainer

    out = Path(a.out)
    marker = out / ".tritlm-demo"
    if out.exists():
        if not marker.exists():
            raise TritlmError(f"{out} exists and is not a previous demo run; choose another --out")
        shutil.rmtree(out)  # the demo's own folder from an earlier run: start clean
    out.mkdir(parents=True)
    marker.write_text("created by `tritlm demo`\n")
    cfg = load_config(None, a.set, preset="tiny", out_dir=str(out), max_steps=a.steps,
                      eval_interval=max(1, a.steps // 4), ckpt_interval=a.steps)
    t0 = time.time()
    r = Trainer(cfg, _Progress("ternary tiny / Tiny Shakespeare")).run()
    from tritlm.formats.packed import pack_checkpoint

    # FP parts kept in float32 (the tiny model's are ~60 KB): the packed model then reproduces the
    # trained one to ~3e-3; the fp16 default of `tritlm pack` adds ~1e-2, enough to flip near-ties.
    packed_dir, rep = pack_checkpoint(r.checkpoint, out / "packed", fp_dtype="fp32")
    trained, packed = tritlm.load(out), tritlm.load(packed_dir)
    prompt = "ROMEO:\n"
    # The packed runtime must reproduce the training model: greedy continuations, and (teacher-forced)
    # the next-token choice and logits at every position, which a single flipped near-tie cannot hide.
    g_train = trained.generate(prompt, max_tokens=64, temperature=0)
    g_packed = packed.generate(prompt, max_tokens=64, temperature=0)
    same = next((i for i, (x, y) in enumerate(zip(g_train, g_packed)) if x != y), min(len(g_train), len(g_packed)))
    ids = trained.tokenizer.encode(prompt + g_train)[:trained.config.max_seq_len]
    lt, lp = trained.logits(ids), packed.logits(ids)
    agree = float((lt.argmax(-1) == lp.argmax(-1)).float().mean())
    rel = float((lt - lp).abs().max() / lt.abs().max())
    t1 = time.time()
    sample = packed.generate(prompt, max_tokens=200, temperature=0.8, top_k=40, seed=1)
    tps = 200 / max(time.time() - t1, 1e-9)
    con = _console()
    con.rule("sample from the packed model (temperature 0.8, top-k 40)")
    con.print(prompt + sample, markup=False, highlight=False)
    con.rule()
    rows = _result_rows(r) + [
        ("packed model", f"{packed_dir}: {rep['weight_bytes'] / 1024:.0f} KiB of weights "
                         f"({rep['ternary_params']:,} ternary weights at 2 bits + FP parts; "
                         f"{rep['overhead_pct']:+.1f}% vs ideal)"),
        ("packed vs trained", f"next-token top-1 agreement {100 * agree:.1f}% over {len(ids)} positions, max "
                              f"logit difference {rel:.1e} (relative); greedy continuations identical for "
                              f"the first {same}/{len(g_train)} characters"),
        ("packed generation", f"{tps:.0f} tok/s (sampling 200 tokens)"),
        ("wall time", f"{time.time() - t0:.0f} s")]
    con.print(_summary_table("tritlm demo summary", rows))
    return 0


# ---- serve ---------------------------------------------------------------------------------------
def cmd_serve(a: argparse.Namespace) -> int:
    require_int("--port", a.port, 0, 65535, "0 = any free port")
    require_int("--max-batch", a.max_batch, 1)
    require_int("--prefix-cache-mb", a.prefix_cache_mb, 0)
    require_int("--max-queue", a.max_queue, 0)
    require_int("--threads", a.threads, 1)
    require_int("--max-prompt-tokens", a.max_prompt_tokens, 1)
    require_int("--max-tokens-limit", a.max_tokens_limit, 1)
    require_int("--kv-len", a.kv_len, 1)
    from tritlm.serve.app import serve

    logging.getLogger("tritlm.serve").setLevel(logging.DEBUG if a.verbose else logging.INFO)
    serve(a.model, a.host, a.port, log_level="debug" if a.verbose else "info",
          model_name=a.model_name, api_key=a.api_key or os.environ.get("TRITLM_API_KEY"),
          max_prompt_tokens=a.max_prompt_tokens, max_tokens_limit=a.max_tokens_limit,
          chat_template=a.chat_template, max_batch=a.max_batch, max_queue=a.max_queue, threads=a.threads,
          prefix_cache_mb=a.prefix_cache_mb, device=a.device, draft=a.draft, draft_k=a.draft_k,
          kv_dtype=a.kv_dtype, kv_len=a.kv_len)
    return 0


# ---- parser --------------------------------------------------------------------------------------
def _add_train_args(p: argparse.ArgumentParser, finetune: bool = False) -> None:
    p.add_argument("--config", help="YAML training config (see configs/)")
    if not finetune:  # a fine-tune takes its architecture and tokenizer from the source model
        p.add_argument("--preset", help="model size preset (tiny, 125M, 350M, 700M, 1.3B, 3B, bitnet-2b4t)")
        p.add_argument("--tokenizer", help="char | byte | bpe:<vocab> | path to tokenizer.json or .model")
    p.add_argument("--out", required=finetune, help="run folder for checkpoints and logs")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--block-size", type=int, help="context length of training windows")
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--data", help="corpus file, folder or .gz (default: bundled Tiny Shakespeare)")
    p.add_argument("--dataset", help="folder written by `tritlm tokenize` (skips tokenising)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--quant-spec", metavar="FILE.yaml",
                   help="per-layer kinds: a YAML mapping of globs over layer names (layers.0.self_attn.q_proj ...) "
                        "to quant configs, first match wins, e.g. '\"layers.*.self_attn.*\": {weight: int8}'; "
                        "stored as model.quant_overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.schedule=two-stage (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tritlm", description="Train, pack, export, run and serve ternary LLMs.")
    from tritlm import __version__

    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"tritlm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="parameter counts, memory and per-layer kinds of a model or the presets")
    s.add_argument("model", nargs="?", help="a checkpoint, packed folder, GGUF / .1bit file or transformers folder")
    s.add_argument("--preset", help="one preset (default: all)")
    s.add_argument("--quant-spec", metavar="FILE.yaml", help="per-layer kinds to apply first (what-if sizes)")
    s.add_argument("--layers", action="store_true", help="list every block Linear with its kind and bytes")
    s.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's)")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("tokenize", help="tokenise a corpus once into memory-mapped train/val token files")
    s.add_argument("corpus", help="a text file, a .gz file or a folder of them")
    s.add_argument("out", help="output folder")
    s.add_argument("--tokenizer", default="char", help="char | byte | bpe:<vocab> | tokenizer path")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.set_defaults(fn=cmd_tokenize)

    s = sub.add_parser("train", help="train a ternary (or --fp) model")
    _add_train_args(s)
    s.add_argument("--fp", action="store_true", help="train the full-precision twin")
    s.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    s.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state with FSDP2 (instead of "
                        "DDP) and write sharded checkpoints (see `tritlm checkpoint-convert`)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("compare", help="train the ternary model and its FP twin on equal terms; table + plot")
    _add_train_args(s)
    s.add_argument("--lrs", help="comma-separated LR sweep; each model is reported at its best LR")
    s.add_argument("--seeds", type=int, help="train every model and LR with N seeds (seed, seed+1, ...); "
                                             "report mean and spread")
    s.add_argument("--equal-bytes", action="store_true",
                   help="also train the widest FP model whose fp16 weights fit in the ternary model's packed bytes")
    s.add_argument("--wide-ternary", action="store_true",
                   help="also train the widest ternary model whose packed bytes fit in the FP twin's fp16 bytes")
    s.add_argument("--variant-lrs", action="append", default=[], metavar="NAME=LR,LR",
                   help="a model's own LR sweep instead of --lrs (NAME: ternary, fp, fp-equal-bytes, "
                        "ternary-wide); repeatable")
    s.set_defaults(fn=cmd_compare)

    s = sub.add_parser("generate", help="sample text from a model")
    s.add_argument("model", help="run folder, checkpoint folder or packed model")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--draft", metavar="MODEL", help="speculative decoding: a smaller packed model with the same "
                                                     "vocabulary proposes tokens the model checks in one pass")
    s.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per round (default 4)")
    s.add_argument("--penalty-alpha", type=float, default=0.0,
                   help="> 0: contrastive search over the --top-k most likely tokens instead of sampling "
                        "(packed models; e.g. --penalty-alpha 0.6 --top-k 4)")
    add_kv_dtype_arg(s)
    add_device_arg(s)
    add_sampling_args(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("demo", help="train the tiny ternary model on Tiny Shakespeare, pack it, generate a sample")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    s.add_argument("model", help="run folder, checkpoint folder or packed model")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0 = any free port")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $TRITLM_API_KEY)")
    s.add_argument("--model-name", help="the model id clients send (default: the model folder's name)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a batch slot; 503 beyond")
    s.add_argument("--max-batch", type=int, default=8,
                   help="requests generated together, decoded in one batched forward per token (default 8)")
    s.add_argument("--prefix-cache-mb", type=int, default=256,
                   help="packed models: MB of K/V of earlier prompts kept for prompts sharing their prefix (0 = off)")
    s.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    s.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: model context)")
    s.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted")
    s.add_argument("--chat-template", help="Jinja chat template file (default: the model's, else plain text)")
    s.add_argument("--draft", metavar="MODEL", help="speculative decoding with this smaller packed model (same "
                                                     "vocabulary); requests then run one at a time, not batched")
    s.add_argument("--draft-k", type=int, default=4, help="tokens the draft proposes per round (default 4)")
    add_kv_dtype_arg(s)
    s.add_argument("--kv-len", type=int, help="packed models: KV cache positions per slot allocated at start, "
                                              "at least (default 256; the cache doubles up to the context as "
                                              "sequences need, each next size allocated in the background)")
    add_device_arg(s)
    s.set_defaults(fn=cmd_serve)
    from tritlm.cli_runtime import add_runtime_commands  # pack, bench, chat, profile, models

    add_runtime_commands(sub)
    from tritlm.cli_formats import add_format_commands  # quantize, export, inspect, validate, repair

    add_format_commands(sub)
    from tritlm.cli_eval import add_eval_commands  # eval

    add_eval_commands(sub)
    from tritlm.cli_finetune import add_finetune_command  # finetune

    add_finetune_command(sub, _add_train_args)
    from tritlm.cli_search import add_search_command  # search

    add_search_command(sub)
    from tritlm.cli_checkpoint import add_checkpoint_commands  # checkpoint-convert

    add_checkpoint_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False)])
    try:
        if args.cmd == "compare" and args.out is None:
            args.out = "runs/compare"
        return args.fn(args) or 0
    except TritlmError as e:
        print(f"tritlm: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"tritlm: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tritlm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `tritlm inspect f.gguf | head`: the reader left; say nothing more (and let Python's exit
        # flush not fail again on the closed stdout)
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
