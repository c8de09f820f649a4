"""Training step time of the ternary model over its FP twin, same shape, measured in one run.

The two models alternate in short blocks so that both see the same machine noise; the ratio of
the medians is printed. Usage: python benchmarks/bench_train_step.py [--preset tiny] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tritlm.model.config import preset
from tritlm.model.transformer import Transformer


def step_fn(model, opt, x, y):
    def step():
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--steps-per-block", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = preset(a.preset, vocab_size=65, max_seq_len=a.block_size)
    x = torch.randint(0, 65, (a.batch_size, a.block_size))
    y = torch.randint(0, 65, (a.batch_size, a.block_size))
    steps = {}
    for name, c in (("fp", cfg.fp_twin()), ("ternary", cfg)):
        torch.manual_seed(0)
        m = Transformer(c)
        steps[name] = step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-3), x, y)
        for _ in range(5):
            steps[name]()
    times = {"fp": [], "ternary": []}
    for _ in range(a.blocks):
        for name in ("fp", "ternary"):
            t0 = time.perf_counter()
            for _ in range(a.steps_per_block):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / a.steps_per_block * 1e3)
    fp, tern = statistics.median(times["fp"]), statistics.median(times["ternary"])
    out = {"preset": a.preset, "threads": a.threads, "fp_ms": fp, "ternary_ms": tern, "ratio": tern / fp}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{a.preset} batch {a.batch_size}x{a.block_size}, {a.threads} thread(s): "
              f"FP {fp:.1f} ms/step, ternary {tern:.1f} ms/step, ratio {tern / fp:.3f}x (medians)")


if __name__ == "__main__":
    main()
