"""Forward+backward time of BitLinear vs nn.Linear (its FP twin), and vs a naive BitNet-FAQ BitLinear.

    python benchmarks/bench_bitlinear.py [--reps 30] [--threads N] [--bf16] [--compile] [--model tiny]

Prints one row per shape: milliseconds per fwd+bwd and the ratios to nn.Linear; with --model, the
time of one training step of that preset, ternary vs its FP twin. The candidates run round-robin
and the first quartile is reported, because shared CPUs are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tritlm.nn import BitLinear
from tritlm.quant import QuantConfig

SHAPES = [  # (tokens, in, out): a tiny model's projections (12 x 64 tokens), a 125M-class MLP
    (12 * 64, 128, 128),
    (12 * 64, 128, 344),
    (12 * 64, 128, 512),
    (12 * 64, 344, 128),
    (8 * 256, 768, 2048),
]


class NaiveBitLinear(nn.Linear):
    """The BitNet b1.58 FAQ reference: STE via x + (q(x) - x).detach() for weights and activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        s = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
        xq = x + ((x * s).round().clamp(-128, 127) / s - x).detach()
        g = w.abs().mean()
        wq = w + ((w / (g + 1e-5)).round().clamp(-1, 1) * g - w).detach()
        return F.linear(xq, wq)


def _step(mod: nn.Module, x: torch.Tensor, ctx) -> None:
    with ctx:
        y = mod(x)
    y.backward(torch.ones_like(y))
    mod.weight.grad = None
    x.grad = None


def _interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 3) -> dict[str, float]:
    """Milliseconds per call of each fn, run round-robin so that load from other jobs hits all alike."""
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps + warmup):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                ts[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 4] * 1e3 for k, v in ts.items()}  # first quartile


def bench_layers(args: argparse.Namespace) -> None:
    hdr = f"{'tokens x in -> out':>22} {'Linear ms':>10} {'BitLinear':>10} {'ratio':>6} {'naive':>6}"
    print(hdr + (f" {'compiled':>8}" if args.compile else ""))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    for n, i, o in SHAPES:
        x = torch.randn(n, i, requires_grad=True)
        mods: dict[str, nn.Module] = {"lin": nn.Linear(i, o, bias=False),
                                      "bit": BitLinear(i, o, config=QuantConfig()),
                                      "naive": NaiveBitLinear(i, o, bias=False)}
        if args.compile:
            mods["comp"] = torch.compile(BitLinear(i, o, config=QuantConfig()))
        reps = args.reps if n * i * o < 1e8 else max(5, args.reps // 4)
        t = _interleaved({k: (lambda m=m, x=x: _step(m, x, ctx)) for k, m in mods.items()}, reps)
        row = (f"{f'{n} x {i} -> {o}':>22} {t['lin']:10.3f} {t['bit']:10.3f} {t['bit'] / t['lin']:6.2f}"
               f" {t['naive'] / t['lin']:6.2f}")
        if args.compile:
            row += f" {t['comp'] / t['lin']:8.2f}"
        print(row)


def bench_model(args: argparse.Namespace) -> None:
    """One optimiser step (fwd + bwd + AdamW) of a preset model: ternary vs its FP twin."""
    from tritlm.model.config import preset
    from tritlm.model.transformer import Transformer

    cfg = preset(args.model)
    if cfg.vocab_size <= 0 or args.model == "tiny":
        cfg = cfg.replace(vocab_size=65)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    seq = min(cfg.max_seq_len, args.seq)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, seq))
    steps = {}
    for name, c in (("fp", cfg.fp_twin()), ("ternary", cfg)):
        torch.manual_seed(0)
        model = Transformer(c)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt) -> None:
            with ctx:
                _, loss = model(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    t = _interleaved(steps, args.reps)
    print(f"model {args.model} batch {args.batch} x {seq}: fp {t['fp']:.2f} ms, ternary {t['ternary']:.2f} ms,"
          f" ratio {t['ternary'] / t['fp']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="run under CPU bfloat16 autocast")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(BitLinear)")
    ap.add_argument("--model", default="", help="also time a training step of this preset (e.g. tiny)")
    ap.add_argument("--model-only", action="store_true", help="skip the per-layer table")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}")
    if args.model:
        bench_model(args)
    if not args.model_only:
        bench_layers(args)


if __name__ == "__main__":
    main()
