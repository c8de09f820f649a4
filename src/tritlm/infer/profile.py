"""Speed and correctness instruments of the CPU runtime: ``tritlm bench``, ``tritlm profile``.

* :func:`bench_model` - decode / prefill tok/s of the packed runtime and the dense PyTorch
  baselines on one packed model, plus the memory-bandwidth ceiling.
* :class:`LayerTimer` - per-layer wall times of an :class:`~tritlm.infer.engine.Engine`, as a table
  and as a Chrome trace (``chrome://tracing`` / Perfetto "traceEvents" JSON).
* :class:`LayerTracer` - per-layer activation statistics (mean, std, absmax, a few values), so two
  implementations (packed engine vs dense, vs the training model) can be compared layer by layer to
  find the first place they diverge.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- timing / tracing
class LayerTimer:
    """Engine ``timer`` hook: records (name, start, duration) of every timed section."""

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        s = time.perf_counter()
        try:
            yield
        finally:
            self.events.append((name, s - self.t0, time.perf_counter() - s))

    def table(self) -> list[tuple[str, int, float, float]]:
        """(section, calls, total ms, mean us) sorted by total time."""
        agg: dict[str, list[float]] = defaultdict(list)
        for name, _, d in self.events:
            agg[name].append(d)
        rows = [(n, len(v), 1e3 * sum(v), 1e6 * sum(v) / len(v)) for n, v in agg.items()]
        return sorted(rows, key=lambda r: -r[2])

    def chrome_trace(self, path: str) -> None:
        ev = [{"name": n, "ph": "X", "ts": 1e6 * s, "dur": 1e6 * d, "pid": os.getpid(), "tid": 0,
               "cat": n.split(".")[-1]} for n, s, d in self.events]
        with open(path, "w") as f:
            json.dump({"traceEvents": ev, "displayTimeUnit": "ms"}, f)


@dataclass
class LayerTracer:
    """Engine ``tracer`` hook: statistics of each traced activation (last row = newest token)."""

    records: list[dict] = field(default_factory=list)

    def __call__(self, name: str, layer: int, t: torch.Tensor) -> None:
        x = t.detach().float()
        self.records.append({"name": name, "layer": layer, "mean": float(x.mean()), "std": float(x.std()),
                             "absmax": float(x.abs().max()), "head": x.reshape(-1)[:8].tolist(),
                             "value": x[-1].clone()})

    def compare(self, other: LayerTracer, tol: float = 1e-2) -> list[dict]:
        """Relative difference of each matching activation; ``first_divergent`` marks the first > tol."""
        out, flagged = [], False
        for a, b in zip(self.records, other.records):
            if (a["name"], a["layer"]) != (b["name"], b["layer"]) or a["value"].shape != b["value"].shape:
                break
            d = float((a["value"] - b["value"]).abs().max() / (b["value"].abs().max() + 1e-12))
            bad = d > tol and not flagged
            flagged |= bad
            out.append({"name": a["name"], "layer": a["layer"], "rel_diff": d, "first_divergent": bad})
        return out


# --------------------------------------------------------------------------- bandwidth
def read_bandwidth(threads: int, mib: int = 512) -> float:
    """Measured DRAM read bandwidth in bytes/s (torch sum over a buffer much larger than the caches)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.ones(mib * (1 << 20) // 4)
        a.sum()
        best = 0.0
        for _ in range(5):
            t = time.perf_counter()
            a.sum()
            best = max(best, a.numel() * 4 / (time.perf_counter() - t))
        return best
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- bench
def _time_decode(eng, n: int, native: list | None = None) -> float:
    """Decode tok/s (greedy, sampling included); ``native`` gets the share of the wall time spent
    in the fused C step + LM head (the rest: Python and torch glue per token)."""
    from tritlm.infer.sampling import SamplingParams

    eng.reset()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    it = eng.generate(prompt, n + 1, SamplingParams(temperature=0))
    next(it)  # the prefill and the first sampled token: not decode
    n0 = eng.stats.native_s
    t = time.perf_counter()
    k = sum(1 for _ in it)
    dt = time.perf_counter() - t
    if native is not None:
        native.append((eng.stats.native_s - n0) / dt)
    return k / dt


def _time_prefill(eng, n: int, reps: int = 2) -> float:
    ids = [(7 * i) % 1000 + 1 for i in range(n)]
    best = float("inf")
    for _ in range(reps):
        eng.reset()
        t = time.perf_counter()
        eng.forward_seq(ids, start=0)
        best = min(best, time.perf_counter() - t)
    return n / best


def kernel_share(eng, reps: int = 20) -> float:
    """Fraction of one decode step on the per-layer torch path spent inside the ternary kernels +
    head (the rest: Python/torch glue, which the fused C path removes)."""
    c = eng.cfg
    x = {k: torch.randn(1, k) for k in {c.dim, c.n_heads * c.head_dim, c.ffn_dim}}
    outs = {}

    def run_all():
        for L in eng.layers:
            for lin in (L.qkv, L.o, L.gu, L.down):
                o = outs.get(id(lin))
                if o is None:
                    o = outs[id(lin)] = torch.empty(1, lin.n)
                lin(x[lin.k], o)
        eng.head(x[c.dim], torch.empty(1, c.vocab_size))

    run_all()
    t = time.perf_counter()
    for _ in range(reps):
        run_all()
    k = (time.perf_counter() - t) / reps
    fused, eng.fused = eng.fused, None
    try:
        step = 1.0 / _time_decode(eng, reps)
    finally:
        eng.fused = fused
    return min(1.0, k / step)


def engine_shapes(cfg, head: str) -> list[tuple[int, int]]:
    """(N, K) of every distinct kernel call the packed engine makes (fused qkv and gate/up)."""
    hd = cfg.head_dim
    shapes = {((cfg.n_heads + 2 * cfg.kv_heads) * hd, cfg.dim), (cfg.dim, cfg.n_heads * hd),
              (2 * cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)}
    if head == "t4":
        shapes.add((4 * cfg.vocab_size, cfg.dim))
    return sorted(shapes)


def bench_model(preset_name: str, threads_list=(1, 2), decode_tokens: int = 64, prompt_tokens: int = 128,
                dense: bool = True, head: str = "t4", seed: int = 0, tune: bool = False) -> dict:
    from tritlm.formats.packed import random_packed, size_report
    from tritlm.infer.engine import Engine
    from tritlm.model.config import preset

    cfg = preset(preset_name, vocab_size=32000, max_seq_len=max(512, prompt_tokens + decode_tokens + 16))
    t = time.perf_counter()
    pm = random_packed(cfg, seed=seed)
    log.info("built random packed %s in %.1f s", preset_name, time.perf_counter() - t)
    sizes = size_report(pm)
    head_bytes = cfg.vocab_size * cfg.dim * {"t4": 1, "f16": 2, "fp32": 4}[head]
    per_token = sizes["ternary_bytes"] + head_bytes
    res: dict = {"model": preset_name, "ternary_params": sizes["ternary_params"],
                 "packed_weight_bytes": sizes["weight_bytes"], "bytes_per_decode_token": per_token,
                 "head": head, "rows": []}
    from tritlm.infer import bench_llama_cpp

    gguf_path = None
    if bench_llama_cpp.available():
        try:
            gguf_path = bench_llama_cpp.gguf_for(pm, head)
            res["llama_cpp"] = f"TQ2_0 GGUF of the same weights ({gguf_path.name}), llama-cpp-python"
        except Exception as e:  # noqa: BLE001 - the peer is optional; say why it is missing
            res["llama_cpp"] = f"export failed: {str(e)[:200]}"
    else:
        res["llama_cpp"] = "not installed (pip install llama-cpp-python)"
    for th in threads_list:
        bw = read_bandwidth(th)
        res["rows"].append({"impl": "bandwidth ceiling", "threads": th, "decode": bw / per_token,
                            "prefill": None, "read_GBps": bw / 1e9})
        if tune:  # cached in autotune.json; the engine's kernels read it when they are built
            from tritlm.kernels import autotune

            for n, k in engine_shapes(cfg, head):
                autotune.tune(n, k, ms=(1, prompt_tokens), threads=th)
        eng = Engine(pm, threads=th, head=head, max_len=cfg.max_seq_len)
        _time_decode(eng, 4)  # warm-up (thread pool, page faults)
        native: list[float] = []
        dec = _time_decode(eng, decode_tokens, native)
        pre = _time_prefill(eng, prompt_tokens)
        row = {"impl": f"tritlm packed (head {head})", "threads": th, "decode": dec, "prefill": pre}
        if eng.fused is not None:
            row["native_share"] = native[0]
        else:
            row["kernel_share"] = kernel_share(eng)
        res["rows"].append(row)
        del eng
        if gguf_path is not None:
            r = bench_llama_cpp.bench(gguf_path, th, decode_tokens, prompt_tokens, cfg.max_seq_len)
            res["rows"].append({"impl": f"llama.cpp TQ2_0 (head {bench_llama_cpp.HEAD_TYPES[head]})",
                                "threads": th, **r})
        if dense:
            for dt, name in ((torch.float32, "torch dense fp32"), (torch.bfloat16, "torch dense bf16")):
                eng = Engine(pm, threads=th, backend="dense", dense_dtype=dt, max_len=cfg.max_seq_len,
                             torch_threads=th)
                n = max(4, decode_tokens // 8)  # dense decode is slow; tok/s is stable over fewer tokens
                _time_decode(eng, 1)
                dec = _time_decode(eng, n)
                pre = _time_prefill(eng, prompt_tokens, reps=1)
                res["rows"].append({"impl": name, "threads": th, "decode": dec, "prefill": pre,
                                    "decode_tokens": n})
                del eng
    res["ratios"] = ratios(res["rows"])
    return res


def ratios(rows: list[dict]) -> list[dict]:
    """Per thread count: our packed runtime over llama.cpp and over the dense bf16 path."""
    out = []
    for th in sorted({r["threads"] for r in rows}):
        by = {r["impl"].split(" (")[0]: r for r in rows if r["threads"] == th}
        ours = by.get("tritlm packed")
        if ours is None:
            continue
        for peer in ("llama.cpp TQ2_0", "torch dense bf16"):
            p = by.get(peer)
            if p is not None:
                out.append({"threads": th, "vs": peer, "decode": ours["decode"] / p["decode"],
                            "prefill": ours["prefill"] / p["prefill"]})
    return out


def run_bench(a: argparse.Namespace) -> int:
    from tritlm.kernels.cpu import kernel_info

    threads = [int(x) for x in str(a.threads).split(",") if x]
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
           "cpu": _cpu_name(), "torch": torch.__version__, "kernel": kernel_info()["backend"],
           "decode_tokens": a.decode_tokens, "prompt_tokens": a.prompt_tokens, "models": []}
    for name in [m for m in a.models.split(",") if m]:
        out["models"].append(bench_model(name, threads, a.decode_tokens, a.prompt_tokens, not a.no_dense,
                                         a.head, tune=getattr(a, "tune", False)))
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"# tritlm bench  {out['date']}  {out['cpu']}  torch {out['torch']}  kernel {out['kernel']}")
    print(f"# decode: {a.decode_tokens} tokens after an 8-token prompt; prefill: {a.prompt_tokens}-token prompt")
    print(f"{'model':6} {'impl':28} {'thr':>3} {'decode tok/s':>12} {'prefill tok/s':>13}  notes")
    for mres in out["models"]:
        for r in mres["rows"]:
            pre = "" if r["prefill"] is None else f"{r['prefill']:.1f}"
            note = ""
            if "read_GBps" in r:
                note = f"{r['read_GBps']:.1f} GB/s read, {mres['bytes_per_decode_token'] / 1e6:.0f} MB/token"
            elif "native_share" in r:
                note = f"Python {100 * (1 - r['native_share']):.0f}% of a decode step (C step + head: the rest)"
            elif "kernel_share" in r:
                note = f"kernels {100 * r['kernel_share']:.0f}% of a decode step"
            elif "decode_tokens" in r:
                note = f"decode over {r['decode_tokens']} tokens"
            print(f"{mres['model']:6} {r['impl']:28} {r['threads']:>3} {r['decode']:>12.1f} {pre:>13}  {note}")
        for q in mres["ratios"]:
            print(f"{mres['model']:6} tritlm / {q['vs']:<23} {q['threads']:>3} {q['decode']:>11.2f}x "
                  f"{q['prefill']:>12.2f}x")
        print(f"{mres['model']:6} llama.cpp: {mres['llama_cpp']}")
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


# --------------------------------------------------------------------------- profile
def run_profile(a: argparse.Namespace) -> int:
    from tritlm.formats.packed import load_packed, random_packed
    from tritlm.infer.engine import Engine
    from tritlm.infer.registry import resolve_path
    from tritlm.model.config import preset

    if a.model:
        pm = load_packed(resolve_path(a.model))
    else:
        pm = random_packed(preset(a.preset, vocab_size=32000, max_seq_len=512))
    eng = Engine(pm, threads=a.threads)
    prompt = [(5 * i) % pm.config.vocab_size for i in range(1, a.prompt_tokens + 1)]
    eng.prefill(prompt)  # warm-up
    eng.reset()
    timer = LayerTimer()
    eng.timer = timer
    t = time.perf_counter()
    logits = eng.prefill(prompt)
    t_pre = time.perf_counter() - t
    t = time.perf_counter()
    tok = int(logits.argmax())
    for _ in range(a.decode_tokens):
        tok = int(eng.forward_seq([tok])[-1].argmax())
    t_dec = (time.perf_counter() - t) / max(1, a.decode_tokens)
    eng.timer = None
    timer.chrome_trace(a.trace)
    print(f"prefill {a.prompt_tokens} tokens: {1e3 * t_pre:.1f} ms; decode on the per-layer (torch) path: "
          f"{1e3 * t_dec:.2f} ms/token ({1 / t_dec:.1f} tok/s), kernels {100 * kernel_share(eng):.0f}% of it")
    if eng.fused is not None:
        native: list[float] = []
        tps = _time_decode(eng, max(4, a.decode_tokens), native)
        print(f"decode on the fused C path (the default; no per-layer hooks): {1e3 / tps:.2f} ms/token "
              f"({tps:.1f} tok/s), Python {100 * (1 - native[0]):.0f}% of it")
    print(f"{'section':16} {'calls':>6} {'total ms':>9} {'mean us':>9}")
    for name, n, tot, mean in timer.table():
        print(f"{name:16} {n:>6} {tot:>9.2f} {mean:>9.1f}")
    print(f"chrome trace: {a.trace}")
    if a.compare:
        ids = prompt[:16]
        tr_p, tr_d = LayerTracer(), LayerTracer()
        eng.tracer = tr_p
        eng.logits(ids)
        dense = Engine(pm, backend="dense")
        dense.tracer = tr_d
        dense.logits(ids)
        print(f"{'activation':12} {'layer':>5} {'rel diff (packed vs dense fp32)':>32}")
        for r in tr_p.compare(tr_d):
            mark = "  <- first > 1e-2" if r["first_divergent"] else ""
            print(f"{r['name']:12} {r['layer']:>5} {r['rel_diff']:>32.2e}{mark}")
    return 0


def _np(x) -> np.ndarray:  # small helper kept for scripts that post-process traces
    return np.asarray(x)
