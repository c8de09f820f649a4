"""Fine-tuning benchmark: a real FP teacher, then four ways to a ternary model at equal tokens.

1. Pretrain a full-precision Llama-architecture teacher with `tritlm train --fp` on the first 90% of
   the TinyStories sample (BPE tokenizer trained on it), export it as a transformers Llama folder
   and check transformers reproduces our logits.
2. From that folder, at equal fine-tuning tokens: (a) PTQ to ternary (`tritlm pack --quant
   ternary`), (b) `tritlm finetune --no-distill` (lambda warmup), (c) `tritlm finetune` with
   distillation (one run per recipe in RECIPES), (d) the same ternary model trained from scratch.
3. Held-out perplexity of each (the last 10% of the sample, never trained on) with `tritlm eval`,
   hf (sliding window) and llama.cpp (chunk, second half scored) protocols.

    .venv/bin/python benchmarks/bench_finetune.py --work runs/bench-finetune [--teacher-steps 400]

Every stage is skipped when its output exists, so a second call resumes. Prints a markdown table
and writes benchmarks/results/finetune-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_sample.txt"
ARCH = {"dim": 256, "n_layers": 4, "n_heads": 8, "ffn_dim": 688, "max_seq_len": 256}
COMMON = ["--threads", "2", "--quiet", "--set", "tensorboard=false", "--set", "eval_batches=8"]
# (name, extra --set flags): the distillation recipes tried; the first is the recommended one.
RECIPES = [
    ("distill", []),
    ("distill-tau2", ["finetune.distill_tau=2.0"]),
    ("distill-subln", ["finetune.sub_norm=true"]),
    ("distill-hidden", ["finetune.hidden_mse=1.0"]),
    ("distill-lr3e-3", ["optim.lr=3e-3"]),
]


def sh(args: list[str], log: Path) -> str:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "tritlm", *args], capture_output=True, text=True, cwd=ROOT)
    log.write_text(f"$ tritlm {' '.join(args)}\n{r.stdout}\n{r.stderr}\n({time.time() - t0:.0f} s)\n")
    if r.returncode != 0:
        raise SystemExit(f"failed: tritlm {' '.join(args)}\n{r.stderr[-2000:]}")
    return r.stdout


def split_corpus(work: Path) -> tuple[Path, Path]:
    train, held = work / "train.txt", work / "heldout.txt"
    if not train.exists():
        lines = DATA.read_text(encoding="utf-8").split("\n")
        cut = int(len(lines) * 0.9)
        train.write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
        held.write_text("\n".join(lines[cut:]), encoding="utf-8")
    return train, held


def done(run: Path, steps: int) -> bool:
    """A run folder whose latest checkpoint is its last step (a killed run resumes instead)."""
    f = run / "checkpoints" / "latest.json"
    return f.exists() and int(json.loads(f.read_text())["step"]) >= steps


def resume_flag(run: Path) -> list[str]:
    return ["--resume"] if (run / "checkpoints" / "latest.json").exists() else []


def check_transformers(hf_dir: Path, ckpt: Path) -> float:
    """Max |logit difference| between transformers on the exported folder and our checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    import tritlm

    ours = tritlm.load(str(ckpt))
    ids = ours.tokenizer.encode("Once upon a time, there was a little girl named Lily.")
    theirs = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        a = theirs(torch.tensor([ids])).logits[0]
    b = ours.logits(ids)
    return float((a - b.reshape(a.shape)).abs().max())


def evaluate(model: Path, held: Path, work: Path, name: str) -> dict:
    out = {}
    for proto in ("hf", "llama.cpp"):
        f = work / f"eval-{name}-{proto}.json"
        if not f.exists():
            stride = ["--stride", "64"] if proto == "hf" else []  # llama.cpp's chunks step by ctx
            txt = sh(["eval", str(model), "--data", str(held), "--protocol", proto, "--ctx", "128", *stride,
                      "--batch-size", "16", "--json"], work / f"eval-{name}-{proto}.log")
            f.write_text(txt)
        out[proto] = json.loads(f.read_text())["ppl"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="runs/bench-finetune")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--ft-fraction", type=float, default=0.1, help="fine-tuning tokens / teacher tokens")
    ap.add_argument("--ft-batch", type=int, default=8)
    ap.add_argument("--recipes", default=",".join(n for n, _ in RECIPES))
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train, held = split_corpus(work)
    arch = [f"--set=model.{k}={v}" for k, v in ARCH.items()]
    block, t_batch = 128, 32

    teacher = work / "teacher"
    if not done(teacher, a.teacher_steps):
        sh(["train", *resume_flag(teacher), "--fp", "--preset", "tiny", *arch, "--data", str(train),
            "--tokenizer", "bpe:4096",
            "--batch-size", str(t_batch), "--block-size", str(block), "--max-steps", str(a.teacher_steps),
            "--lr", "1e-3", "--set", "optim.schedule=cosine", "--set", "optim.warmup_steps=50",
            "--set", "optim.wd_schedule=constant", "--set", "data.val_fraction=0.05",
            "--eval-interval", "100", *COMMON, "--out", str(teacher)], work / "teacher.log")
    hf_dir = work / "teacher-hf"
    if not hf_dir.exists():
        sh(["export", str(teacher), str(hf_dir), "--format", "hf"], work / "export.log")
    logit_diff = check_transformers(hf_dir, teacher)

    teacher_tokens = a.teacher_steps * t_batch * block
    ft_steps = max(1, round(teacher_tokens * a.ft_fraction / (a.ft_batch * block)))
    dataset = teacher / "data"  # tokenised by the teacher's own run: the very same tokenizer
    ft = ["--dataset", str(dataset), "--batch-size", str(a.ft_batch), "--block-size", str(block),
          "--max-steps", str(ft_steps), "--eval-interval", str(max(1, ft_steps // 4)),
          "--set", f"ckpt_interval={max(1, ft_steps // 4)}", *COMMON]

    results = {"teacher": {"ppl": evaluate(teacher, held, work, "teacher"), "tokens": teacher_tokens}}
    ptq = work / "ptq-packed"
    if not ptq.exists():
        sh(["pack", str(hf_dir), str(ptq), "--quant", "ternary"], work / "ptq.log")
    results["a-ptq"] = {"ppl": evaluate(ptq, held, work, "a-ptq"), "tokens": 0}

    runs = [("b-lambda", ["--no-distill"])]
    chosen = a.recipes.split(",")
    runs += [(f"c-{n}", [x for s in sets for x in ("--set", s)]) for n, sets in RECIPES if n in chosen]
    for name, extra in runs:
        out = work / name
        t0 = time.time()
        if not done(out, ft_steps):
            sh(["finetune", str(hf_dir), "--out", str(out), *ft, *extra, *resume_flag(out)], work / f"{name}.log")
        results[name] = {"ppl": evaluate(out, held, work, name), "tokens": ft_steps * a.ft_batch * block,
                         "flags": extra, "wall_s": round(time.time() - t0)}

    scratch = work / "d-scratch"
    if not done(scratch, ft_steps):
        sh(["train", "--preset", "tiny", *arch, *ft, "--lr", "2e-3", "--out", str(scratch), *resume_flag(scratch)],
           work / "scratch.log")
    results["d-scratch"] = {"ppl": evaluate(scratch, held, work, "d-scratch"), "tokens": ft_steps * a.ft_batch * block}

    t_ppl = results["teacher"]["ppl"]["hf"]
    print(f"teacher: {teacher_tokens:,} tokens; transformers vs tritlm max |logit diff| {logit_diff:.2e}")
    print(f"fine-tuning: {ft_steps} steps x {a.ft_batch} x {block} = {ft_steps * a.ft_batch * block:,} tokens "
          f"({a.ft_fraction:.0%} of the teacher's)\n")
    print("| model | ppl (hf, ctx 128 stride 64) | ppl (llama.cpp, ctx 128) | vs teacher |")
    print("|---|---|---|---|")
    for name, r in results.items():
        p = r["ppl"]
        print(f"| {name} | {p['hf']:.3f} | {p['llama.cpp']:.3f} | {p['hf'] / t_ppl - 1:+.1%} |")
    stamp = time.strftime("%Y-%m-%d")
    dest = ROOT / "benchmarks" / "results" / f"finetune-{stamp}.json"
    dest.write_text(json.dumps({"teacher_logit_diff_vs_transformers": logit_diff, "ft_steps": ft_steps,
                                "ft_batch": a.ft_batch, "block": block, "arch": ARCH, "results": results},
                               indent=2) + "\n")
    print(f"\nwrote {dest}")


if __name__ == "__main__":
    main()
