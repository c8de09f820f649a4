"""Packed CPU kernels (ternary by default; --kind int8 / int4 / binary) vs torch dense F.linear:
decode (M=1) and prefill (M=128), on the route $TRITLM_KERNEL picks (avx512 / avx2 / portable).

    .venv/bin/python benchmarks/bench_kernels.py            # table
    .venv/bin/python benchmarks/bench_kernels.py --json     # JSON on stdout (or --json out.json)
    TRITLM_KERNEL=avx2 .venv/bin/python benchmarks/bench_kernels.py --kind int4

Decode weights are streamed from DRAM as in a real model: every route cycles through enough
copies of the weight matrix (>= --stream-mb in total) that nothing is left in the caches.
"Floor" = the time to read the packed weights once (ternary N*K/4 bytes, int8 N*K, int4 N*K/2 plus
its group scales, binary N*K/8) at the read bandwidth measured
here with the same number of threads (numpy/torch sums over a large array, best of a few).
Prefill is reported in GOP/s = 2*M*N*K / time. Every time is the median of one round of calls,
best of --rounds rounds (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from tritlm.kernels import TernaryLinearKernel, kernel_info, set_num_threads
from tritlm.kernels.cpu.lowbit import BinaryLinearKernel, Int4LinearKernel, Int8LinearKernel
from tritlm.sysinfo import cpu_name

SHAPES = [(2048, 2048), (4096, 4096), (11008, 4096)]


def measure_read_bw(threads: int, mb: int = 512, reps: int = 5) -> float:
    """Best-of read bandwidth (bytes/s) with `threads` threads: numpy sums of disjoint chunks."""
    a = np.ones(mb * (1 << 20) // 8, dtype=np.float64)
    chunks = np.array_split(a, threads)
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=np.sum, args=(c,)) for c in chunks]
        t0 = time.perf_counter()
        if threads == 1:
            np.sum(a)
        else:
            [t.start() for t in ts]
            [t.join() for t in ts]
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    torch.set_num_threads(threads)
    ta = torch.from_numpy(a)
    for _ in range(reps):
        t0 = time.perf_counter()
        ta.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best


def _time_rotating(fns, reps: int, rounds: int = 1) -> float:
    """Median time of one call, cycling through `fns` (one per weight copy); best of `rounds`
    rounds (the machine is shared: the best round is the one least disturbed by other jobs)."""
    for f in fns[: min(len(fns), 4)]:
        f()
    n = len(fns)
    best = float("inf")
    for _ in range(rounds):
        ts = []
        for i in range(max(reps, n)):
            f = fns[i % n]
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        best = min(best, float(np.median(ts)))
    return best


def _copies(nbytes: int, stream_bytes: int, m: int) -> int:
    return max(1, math.ceil(stream_bytes / nbytes)) if m == 1 else 1


INT4_GROUP = 32  # the q4 head's group size


def make_kernel(kind: str, w: np.ndarray, threads: int, like=None):
    """A kernel of ``kind`` for levels ``w``; ``like``: another kernel's packed weights (a copy)."""
    src = like.packed if like is not None else w
    if kind == "ternary":
        return TernaryLinearKernel(src, 0.5, threads=threads)
    if kind == "int8":
        return Int8LinearKernel(src, 0.5, threads=threads)
    if kind == "binary":
        return BinaryLinearKernel(src, 0.5, threads=threads)
    return Int4LinearKernel(src, np.full((w.shape[0], -(-w.shape[1] // INT4_GROUP)), 0.5, np.float32), INT4_GROUP,
                            threads=threads)


def levels(kind: str, n: int, k: int, rng) -> np.ndarray:
    if kind == "binary":
        return rng.integers(0, 2, size=(n, k), dtype=np.int8) * 2 - 1
    hi = {"ternary": 1, "int8": 127, "int4": 7}[kind]
    return rng.integers(-hi, hi + 1, size=(n, k), dtype=np.int8)


def packed_bytes(kind: str, n: int, k: int) -> int:
    return {"ternary": n * k // 4, "int8": n * k, "binary": n * k // 8,
            "int4": n * k // 2 + n * -(-k // INT4_GROUP) * 4}[kind]


def bench_shape(n, k, m, threads, bw, args, rng):
    w = levels(args.kind, n, k, rng)
    stream = args.stream_mb << 20
    reps = args.reps_decode if m == 1 else args.reps_prefill
    x_np = rng.standard_normal((m, k)).astype(np.float32)
    x = torch.from_numpy(x_np)
    set_num_threads(threads)
    torch.set_num_threads(threads)
    row = {"n": n, "k": k, "m": m, "threads": threads, "kind": args.kind}

    # ours
    nbytes = packed_bytes(args.kind, n, k)
    base = make_kernel(args.kind, w, threads)
    kerns = [base] + [make_kernel(args.kind, w, threads, like=base) for _ in range(_copies(nbytes, stream, m) - 1)]
    row["backend"] = base.backend
    out = torch.empty(m, n)
    row["ours_us"] = _time_rotating([lambda kk=kk: kk(x, out=out) for kk in kerns], reps, args.rounds) * 1e6
    row["weight_bytes"] = nbytes
    del kerns
    if m == 1:
        floor_us = row["weight_bytes"] / bw * 1e6
        row["floor_us"] = floor_us
        row["pct_floor"] = 100.0 * floor_us / row["ours_us"]
        row["ours_gbs"] = row["weight_bytes"] / row["ours_us"] / 1e3
    row["ours_gops"] = 2.0 * m * n * k / row["ours_us"] / 1e3

    # torch dense
    wf = torch.from_numpy(w.astype(np.float32)) * 0.5
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name in args.skip:
            continue
        wd = wf.to(dt)
        xd = x.to(dt)
        nb = wd.numel() * wd.element_size()
        ws = [wd] + [wd.clone() for _ in range(_copies(nb, stream, m) - 1)]
        r = max(3, reps // 4) if dt is torch.bfloat16 else reps
        with torch.inference_mode():
            t = _time_rotating([lambda ww=ww, xd=xd: F.linear(xd, ww) for ww in ws], r, args.rounds)
        row[f"{name}_us"] = t * 1e6
        row[f"speedup_vs_{name}"] = t * 1e6 / row["ours_us"]
        if m == 1:
            row[f"{name}_pct_floor"] = 100.0 * row["weight_bytes"] / bw / t
        del ws, wd
    return row


def fmt_table(rows, bws) -> str:
    lines = []
    lines.append("read bandwidth: " + ", ".join(f"{t} thr {b / 1e9:.1f} GB/s" for t, b in bws.items()))
    hdr = (f"{'shape':>11} {'M':>4} {'thr':>3} | {'ours us':>9} {'GB/s':>6} {'%floor':>6} {'GOP/s':>7} | "
           f"{'fp32 us':>9} {'bf16 us':>9} | {'x fp32':>7} {'x bf16':>7}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in rows:
        gbs = f"{r['ours_gbs']:6.1f}" if "ours_gbs" in r else f"{'':>6}"
        pct = f"{r['pct_floor']:5.0f}%" if "pct_floor" in r else f"{'':>6}"
        f32 = f"{r['fp32_us']:9.0f}" if "fp32_us" in r else f"{'-':>9}"
        b16 = f"{r['bf16_us']:9.0f}" if "bf16_us" in r else f"{'-':>9}"
        s32 = f"{r['speedup_vs_fp32']:6.1f}x" if "speedup_vs_fp32" in r else f"{'-':>7}"
        s16 = f"{r['speedup_vs_bf16']:6.1f}x" if "speedup_vs_bf16" in r else f"{'-':>7}"
        lines.append(f"{r['n']:>5}x{r['k']:<5} {r['m']:>4} {r['threads']:>3} | {r['ours_us']:9.0f} {gbs} {pct} "
                     f"{r['ours_gops']:7.1f} | {f32} {b16} | {s32} {s16}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                    help="comma-separated NxK list (N outputs, K inputs)")
    ap.add_argument("--m", default="1,128", help="batch sizes (1 = decode)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps-decode", type=int, default=60)
    ap.add_argument("--reps-prefill", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per measurement; the best is kept")
    ap.add_argument("--stream-mb", type=int, default=128, help="weight bytes cycled through for decode")
    ap.add_argument("--skip", default="", help="comma list of routes to skip: fp32,bf16")
    ap.add_argument("--kind", choices=("ternary", "int8", "int4", "binary"), default="ternary",
                    help=f"weight kind (int4: group {INT4_GROUP})")
    ap.add_argument("--tune", action="store_true", help="autotune each shape first (cached)")
    ap.add_argument("--json", nargs="?", const="-", default=None,
                    help="write JSON results to PATH (or stdout when no PATH)")
    args = ap.parse_args(argv)
    args.skip = [s for s in args.skip.split(",") if s]
    logging.basicConfig(level=logging.WARNING)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    rng = np.random.default_rng(0)

    info = kernel_info()
    bws = {t: measure_read_bw(t) for t in threads}
    rows = []
    for n, k in shapes:
        for t in threads:
            if args.tune:
                set_num_threads(t)
                make_kernel(args.kind, levels(args.kind, n, k, rng), t).tune(ms=ms, threads=t)
            for m in ms:
                rows.append(bench_shape(n, k, m, t, bws[t], args, rng))
                if args.json != "-":
                    print(fmt_table(rows[-1:], {}).splitlines()[-1], file=sys.stderr, flush=True)
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "kernel": info,
        "read_bw_gbs": {str(t): b / 1e9 for t, b in bws.items()},
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if args.json == "-":
        print(json.dumps(result, indent=1))
        return result
    print(f"\n{result['machine']['cpu']}, {result['machine']['cores']} cores, {args.kind} on {info['backend']}, "
          f"torch {torch.__version__}, {result['date']}")
    print(fmt_table(rows, bws))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
