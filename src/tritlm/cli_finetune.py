"""`tritlm finetune`: turn an existing full-precision model into a ternary (or mixed) one."""

from __future__ import annotations

import argparse
import os

# The fine-tuning defaults (configs/finetune-ternary.yaml is the commented recipe): a --config file
# and --set override them key by key. Measured on the TinyStories teacher (benchmarks/RESULTS.md).
FINETUNE_DEFAULTS = {
    "max_steps": 1000,
    "batch_size": 8,
    "block_size": 128,
    "eval_interval": 100,
    "ckpt_interval": 250,
    "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 20, "weight_decay": 0.0,
              "wd_schedule": "constant", "min_lr_ratio": 0.1},
    "quant_schedule": {"lam_schedule": "linear", "lam_warmup_frac": 0.5, "lam_warmup_steps": 0, "lam_k": 10.0},
    "finetune": {"distill_alpha": 1.0, "distill_tau": 1.0, "hidden_mse": 0.0, "sub_norm": False,
                 "teacher_dtype": "auto"},
}


def cmd_finetune(a: argparse.Namespace) -> int:
    from tritlm.cli import _console, _Progress, _result_rows, _summary_table, _train_config

    extra = {"finetune.source": a.source}
    if a.no_distill:
        extra.update({"finetune.distill_alpha": 0.0, "finetune.hidden_mse": 0.0})
    cfg = _train_config(a, base=FINETUNE_DEFAULTS, **extra)
    from tritlm.train.trainer import Trainer

    rank0 = int(os.environ.get("RANK", "0")) == 0
    prog = _Progress("finetune", quiet=a.quiet or not rank0)
    r = Trainer(cfg, prog).run(resume=a.resume)
    if rank0:
        f = cfg.finetune
        rows = [("source", str(f.source)),
                ("recipe", f"lambda {cfg.quant_schedule.lam_schedule} over "
                           f"{_warmup_text(cfg)}, distill alpha {f.distill_alpha:g} tau {f.distill_tau:g}"
                           f"{f', hidden MSE {f.hidden_mse:g}' if f.hidden_mse else ''}"
                           f"{', SubLN inserted' if f.sub_norm else ''}"),
                *_result_rows(r)]
        _console().print(_summary_table("fine-tuning summary", rows))
    return 0


def _warmup_text(cfg) -> str:
    q = cfg.quant_schedule
    if q.lam_warmup_frac > 0:
        return f"{q.lam_warmup_frac:.0%} of the run"
    return f"{q.lam_warmup_steps} steps" if q.lam_warmup_steps else "0 steps (quantised from the start)"


def add_finetune_command(sub, add_train_args) -> None:
    s = sub.add_parser(
        "finetune", help="fine-tune a full-precision model (transformers folder or checkpoint) into ternary",
        description="Convert the block Linears of SRC per a spec (default: every one ternary; embeddings, "
                    "norms and head stay full precision), keep its tokenizer, and train with gradual "
                    "quantisation (lambda warmup) and distillation from the frozen source. Defaults: "
                    "cosine LR 1e-3, lambda linear over the first half, distillation alpha 1 at tau 1; "
                    "see configs/finetune-ternary.yaml.")
    s.add_argument("source", help="a transformers Llama / Mistral / Qwen2-style folder, a tritlm checkpoint, "
                                  "GGUF or .1bit file")
    add_train_args(s, finetune=True)
    s.add_argument("--no-distill", action="store_true", help="plain cross-entropy (no teacher is loaded)")
    s.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    s.set_defaults(fn=cmd_finetune)
