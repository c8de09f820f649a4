"""GPU benchmark (issue 15): the Triton kernels vs cuBLAS bf16, whole-model decode, training steps.

One command on one H100 / H200, under 8 minutes:

    .venv/bin/python benchmarks/bench_gpu.py --json-out benchmarks/results/gpu.json

Prints, measured in this one run: per shape and M the Triton ternary kernel vs ``torch.matmul``
bf16 (CUDA events, weights rotated beyond L2), effective GB/s as a fraction of a measured
device copy and of the spec-sheet HBM peak; decode / prefill tok/s of packed models on the GPU
runtime vs dense bf16; a BitLinear training step vs ``nn.Linear`` bf16 and whole-model training
steps with MFU. ``--smoke`` runs every section on tiny shapes (on CPU tensors in Triton's
interpreter where there is no GPU): the test suite does, so the script keeps working.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch

if not torch.cuda.is_available():  # Triton reads this when its kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tritlm.infer import gpu_bench as gb  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script, measure nothing")
    ap.add_argument("--sections", default="kernels,decode,train", help="comma-separated subset to run")
    ap.add_argument("--models", default="700M,2B4T", help="decode section: presets (700M, 2B4T, 125M, ...)")
    ap.add_argument("--train-presets", default="125M,1.3B")
    ap.add_argument("--json-out", help="also write every row as JSON here")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type != "cuda" and not a.smoke:
        print("bench_gpu: no CUDA GPU here; --smoke runs the script on tiny CPU shapes", file=sys.stderr)
        return 2
    sections = {s.strip() for s in a.sections.split(",") if s.strip()}
    t0 = time.time()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    copy = gb.copy_bandwidth(dev)
    peak = gb.peak_hbm(dev)
    doc: dict = {"device": name, "torch": torch.__version__, "copy_gbs": copy / 1e9,
                 "peak_hbm_gbs": None if peak is None else peak / 1e9}
    print(f"device {name}, torch {torch.__version__}; measured copy {copy / 1e9:.0f} GB/s"
          + ("" if peak is None else f", spec HBM {peak / 1e9:.0f} GB/s"))
    if "kernels" in sections:
        rows = gb.bench_kernels(dev, gb.SMOKE_SHAPES if a.smoke else None, gb.SMOKE_MS if a.smoke else None,
                                reps=2 if a.smoke else 50)
        doc["kernels"] = [asdict(r) | {"speedup": r.speedup} for r in rows]
        print(f"\n{'shape':14} {'n x k':>12} {'M':>5} {'ternary us':>11} {'bf16 us':>9} {'x bf16':>7} "
              f"{'tern GB/s':>9} {'% copy':>6} {'% peak':>6}")
        for r in rows:
            pk = "" if peak is None else f"{100 * r.ternary_gbs * 1e9 / peak:6.0f}"
            print(f"{r.shape:14} {f'{r.n}x{r.k}':>12} {r.m:>5} {r.ternary_us:>11.1f} {r.bf16_us:>9.1f} "
                  f"{r.speedup:>7.2f} {r.ternary_gbs:>9.0f} {100 * r.ternary_gbs * 1e9 / copy:>6.0f} {pk:>6}")
    if "decode" in sections:
        rows = gb.bench_decode(dev, [m for m in a.models.split(",") if m], smoke=a.smoke,
                               prompt_tokens=8 if a.smoke else 128, decode_tokens=4 if a.smoke else 64)
        doc["decode"] = [asdict(r) for r in rows]
        print(f"\n{'model':6} {'runtime':26} {'weights MB':>10} {'prefill tok/s':>13} {'decode tok/s':>12} "
              f"{'8 seqs tok/s':>12}")
        for r in rows:
            print(f"{r.model:6} {r.runtime:26} {r.weight_mb:>10.0f} {r.prefill_tok_s:>13.0f} {r.decode_tok_s:>12.1f} "
                  f"{r.batch8_tok_s:>12.1f}")
    if "train" in sections:
        rows = gb.bench_train(dev, [p for p in a.train_presets.split(",") if p], smoke=a.smoke)
        doc["train"] = [asdict(r) for r in rows]
        print(f"\n{'training':58} {'ms':>9} {'tok/s':>10} {'MFU':>6}")
        for r in rows:
            mfu = "" if r.mfu is None else f"{100 * r.mfu:5.1f}%"
            print(f"{r.what:58} {r.ms:>9.2f} {r.tok_s:>10.0f} {mfu:>6}")
    doc["wall_s"] = time.time() - t0
    print(f"\nwall time {doc['wall_s']:.0f} s")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
