"""Speed and correctness instruments of the CPU runtime (``tritlm bench``, ``tritlm profile``
print what these return).

* :func:`bench_model` - decode / prefill tok/s of the packed runtime and the dense PyTorch
  baselines on one packed model, plus the memory-bandwidth ceiling; :func:`bench_models` - that
  for several presets, with the machine's description.
* :func:`profile_model` - per-section timings of the packed engine (:class:`ProfileReport`).
* :class:`LayerTimer` - per-layer wall times of an :class:`~tritlm.infer.engine.Engine`, as a table
  and as a Chrome trace (``chrome://tracing`` / Perfetto "traceEvents" JSON).
* :class:`LayerTracer` - per-layer activation statistics (mean, std, absmax, a few values), so two
  implementations (packed engine vs dense, vs the training model) can be compared layer by layer to
  find the first place they diverge.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tritlm.nn.runtime import HEAD_BYTES_PER_WEIGHT
from tritlm.sysinfo import cpu_name

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
    """Measured DRAM read bandwidth in bytes/s (torch sum over a buffer much larger than the caches),
    on huge pages as the packed runtime's weights are: on 4 KiB pages the TLB misses of a virtual
    machine had put this "ceiling" below what the runtime reads (session 15: 21.5 GB/s, exceeded)."""
    from tritlm.hugepages import huge_empty

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = huge_empty(mib * (1 << 20)).view(torch.float32).fill_(1.0)
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
    ids = [((7 * i) % 1000 + 1) % eng.cfg.vocab_size for i in range(n)]  # any vocabulary
    best = float("inf")
    for _ in range(reps):
        eng.reset()
        t = time.perf_counter()
        eng.forward_seq(ids, start=0)
        best = min(best, time.perf_counter() - t)
    return n / best


_SECTION_LINEARS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                    "down": ("down_proj",)}


def fused_profile(eng, n: int, read_bw: float) -> list[dict]:
    """Where a fused decode step's time goes: the C layers by section (the four Linears of every
    layer, attention, the row work between them), the LM head, and Python (sampling and glue),
    each with the weight bytes it reads per token and the share of the read-bandwidth ceiling
    (``read_bw`` bytes/s) that reaches. ``n`` greedy tokens after the prefill."""
    from tritlm.infer.sampling import SamplingParams

    nbytes = {sec: sum(pl.nbytes for name, pl in eng.pm.linears.items() if name.rsplit(".", 1)[-1] in names)
              for sec, names in _SECTION_LINEARS.items()}
    nbytes["head"] = int(eng.cfg.vocab_size * eng.cfg.dim * HEAD_BYTES_PER_WEIGHT[eng.head_kind])
    eng.reset()
    it = eng.generate([1, 2, 3, 4, 5, 6, 7, 8], n + 1, SamplingParams(temperature=0))
    next(it)  # the prefill and the first token
    eng.fused.set_profile(True)
    n0 = eng.stats.native_s
    t = time.perf_counter()
    k = sum(1 for _ in it)
    wall = time.perf_counter() - t
    native = eng.stats.native_s - n0
    secs, _calls = eng.fused.read_profile()
    eng.fused.set_profile(False)
    secs["head"] = max(0.0, native - sum(secs.values()))
    secs["python"] = max(0.0, wall - native)
    rows = []
    for name, sec in secs.items():
        per = sec / max(1, k)
        b = nbytes.get(name, 0)
        rows.append({"section": name, "ms_per_token": 1e3 * per, "share": sec / wall, "mb_per_token": b / 1e6,
                     "gb_s": b / per / 1e9 if b and per else None,
                     "ceiling": b / per / read_bw if b and per else None})
    total_b = sum(nbytes.values())
    rows.append({"section": "total", "ms_per_token": 1e3 * wall / max(1, k), "share": 1.0,
                 "mb_per_token": total_b / 1e6, "gb_s": total_b * k / wall / 1e9,
                 "ceiling": total_b * k / wall / read_bw})
    return rows


def kernel_share(eng, reps: int = 20) -> float:
    """Fraction of one decode step on the per-layer torch path spent inside the Linear kernels +
    head (the rest: Python/torch glue, which the fused C path removes)."""
    c = eng.cfg
    x = {k: torch.randn(1, k) for k in {c.dim, c.n_heads * c.head_dim, c.ffn_dim}}
    outs = {}

    def run_all():
        for mod in eng.linear_modules():
            lin = mod.runner
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
                dense: bool = True, head: str = "t4", seed: int = 0, tune: bool = False,
                quant_spec=None, reps: int = 3, kv_dtype: str = "f16") -> dict:
    """Our packed runtime vs llama.cpp on the same weights and vs dense PyTorch, per thread count.

    Ours and ``llama-bench`` run ``reps`` times, interleaved; their rows hold the medians and the
    ``*_range`` (min, max) of the repetitions.

    ``preset_name``: a preset (random weights of each layer's kind) or a packed folder.
    ``quant_spec``: per-layer kinds ``{glob: fields or kind}`` for a preset (a mixed model).
    ``kv_dtype``: our KV cache ("f16", llama-bench's default cache type too, or "f32").
    """
    from pathlib import Path

    from tritlm.formats.packed import is_packed, load_packed, random_packed, size_report
    from tritlm.infer.engine import Engine
    from tritlm.model.config import preset, quant_overrides_from

    t = time.perf_counter()
    if is_packed(preset_name):
        pm = load_packed(preset_name)
        need = prompt_tokens + decode_tokens + 16
        if pm.config.max_seq_len < need:
            raise ValueError(f"{preset_name}: context {pm.config.max_seq_len} < the {need} positions the bench needs")
        cfg = pm.config
        preset_name = Path(preset_name).name
    else:
        cfg = preset(preset_name, vocab_size=32000, max_seq_len=max(512, prompt_tokens + decode_tokens + 16))
        if quant_spec:
            cfg = cfg.replace(quant_overrides=quant_overrides_from(quant_spec, cfg.quant))
        pm = random_packed(cfg, seed=seed)
    log.info("built packed %s in %.1f s", preset_name, time.perf_counter() - t)
    mixed = cfg.uniform_quant is None or cfg.quant.kind != "ternary"
    sizes = size_report(pm)
    head_bytes = int(cfg.vocab_size * cfg.dim * HEAD_BYTES_PER_WEIGHT[head])
    per_token = sizes["ternary_bytes"] + sizes["fp_linear_bytes"] + head_bytes
    res: dict = {"model": preset_name, "ternary_params": sizes["ternary_params"], "kinds": sizes["kinds"],
                 "packed_weight_bytes": sizes["weight_bytes"], "bytes_per_decode_token": per_token,
                 "head": head, "kv_dtype": kv_dtype, "rows": []}
    from tritlm.infer import bench_llama_cpp

    gguf_path = None
    lb = bench_llama_cpp.llama_bench_binary()
    notes = []
    try:
        gguf_path = bench_llama_cpp.gguf_for(pm, head)
    except Exception as e:  # noqa: BLE001 - the peer is optional; say why it is missing
        notes.append(f"GGUF export failed: {str(e)[:200]}")
    if gguf_path is not None:
        notes.append(f"{'mixed' if mixed else 'TQ2_0'} GGUF of the same weights ({gguf_path.name})")
        notes.append(f"llama-bench {lb}" if lb is not None else
                     "llama-bench not built (bash benchmarks/build_llama_tools.sh)")
        if not bench_llama_cpp.available():
            notes.append("llama-cpp-python not installed")
    res["llama_cpp"] = "; ".join(notes)
    for th in threads_list:
        if tune:  # cached in autotune.json; the engine's kernels read it when they are built
            from tritlm.kernels.cpu.tuning import tune

            for n, k in engine_shapes(cfg, head):
                tune(n, k, ms=(1, prompt_tokens), threads=th)
        # the whole context allocated up front: no cache growth inside a timed run
        eng = Engine(pm, threads=th, head=head, max_len=cfg.max_seq_len, kv_dtype=kv_dtype,
                     cache_len=cfg.max_seq_len)
        _time_decode(eng, 4)  # warm-up (thread pool, page faults)
        ours: dict[str, list[float]] = {"decode": [], "prefill": []}
        peer: dict[str, list[float]] = {"decode": [], "prefill": []}
        native: list[float] = []
        bws: list[float] = []
        repack = True  # llama-bench's weight repacking stayed on in every run
        # interleaved: a slow minute of a shared machine hits both sides, not one; the read
        # bandwidth too (one probe had read 24.8 and 29.2 GB/s a minute apart), so each decode run
        # is set against the ceiling measured just before it
        for _ in range(reps):
            bws.append(read_bandwidth(th))
            ours["decode"].append(_time_decode(eng, decode_tokens, native))
            ours["prefill"].append(_time_prefill(eng, prompt_tokens))
            if gguf_path is not None and lb is not None:
                r = bench_llama_cpp.llama_bench(lb, gguf_path, th, decode_tokens, prompt_tokens)
                peer["decode"].append(r["decode"])
                peer["prefill"].append(r["prefill"])
                repack = repack and r["repack"]
        res["rows"].append({"impl": "bandwidth ceiling", "threads": th,
                            "decode": statistics.median(bws) / per_token, "prefill": None,
                            "read_GBps": statistics.median(bws) / 1e9,
                            "read_GBps_range": [min(bws) / 1e9, max(bws) / 1e9]})
        row = {"impl": f"tritlm packed (head {head}, kv {kv_dtype})", "threads": th, **_median_spread(ours),
               # decode over the ceiling of the same repetition, median over the repetitions
               "ceiling_share": statistics.median(d * per_token / b for d, b in zip(ours["decode"], bws))}
        if eng.fused is not None:
            row["native_share"] = statistics.median(native)
        else:
            row["kernel_share"] = kernel_share(eng)
        res["rows"].append(row)
        if peer["decode"]:
            res["rows"].append({"impl": f"llama-bench {'mixed GGUF' if mixed else 'TQ2_0'} "
                                        f"(head {bench_llama_cpp.HEAD_TYPES[head]}"
                                        f"{'' if repack else ', --repack 0'})",
                                "threads": th, **_median_spread(peer)})
        del eng
        if gguf_path is not None and bench_llama_cpp.available():
            r = bench_llama_cpp.bench(gguf_path, th, decode_tokens, prompt_tokens, cfg.max_seq_len)
            res["rows"].append({"impl": f"llama-cpp-python {'mixed GGUF' if mixed else 'TQ2_0'} "
                                        f"(head {bench_llama_cpp.HEAD_TYPES[head]})", "threads": th, **r})
        if dense:
            for dt, name in ((torch.float32, "torch dense fp32"), (torch.bfloat16, "torch dense bf16")):
                eng = Engine(pm, threads=th, backend="dense", dense_dtype=dt, max_len=cfg.max_seq_len,
                             cache_len=cfg.max_seq_len,
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


def _median_spread(runs: dict[str, list[float]]) -> dict:
    """``{"decode": median, "decode_range": [min, max], ...}`` of repeated measurements."""
    out: dict = {}
    for k, v in runs.items():
        out[k] = statistics.median(v)
        out[f"{k}_range"] = [min(v), max(v)]
        out[f"{k}_runs"] = len(v)
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """Per thread count: our packed runtime over the bandwidth ceiling (decode), llama.cpp and the
    dense bf16 path."""
    out = []
    for th in sorted({r["threads"] for r in rows}):
        by = {r["impl"].split(" (")[0]: r for r in rows if r["threads"] == th}
        ours = by.get("tritlm packed")
        if ours is None:
            continue
        if "ceiling_share" in ours:
            out.append({"threads": th, "vs": "bandwidth ceiling", "decode": ours["ceiling_share"], "prefill": None})
        for peer in ("llama-bench TQ2_0", "llama-bench mixed GGUF", "llama-cpp-python TQ2_0",
                     "llama-cpp-python mixed GGUF", "torch dense bf16"):
            p = by.get(peer)
            if p is not None:
                out.append({"threads": th, "vs": peer, "decode": ours["decode"] / p["decode"],
                            "prefill": ours["prefill"] / p["prefill"]})
    return out


def bench_models(models: Sequence[str] = ("700M", "125M"), threads: Sequence[int] = (1, 2),
                 decode_tokens: int = 64, prompt_tokens: int = 128, dense: bool = True, head: str = "t4",
                 tune: bool = False, quant_spec=None, reps: int = 3, kv_dtype: str = "f16") -> dict:
    """:func:`bench_model` for each preset in ``models``, with the machine's description: the
    document ``tritlm bench --json`` prints."""
    from tritlm.kernels.cpu import kernel_info

    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
           "cpu": cpu_name(), "torch": torch.__version__, "kernel": kernel_info()["backend"],
           "decode_tokens": decode_tokens, "prompt_tokens": prompt_tokens, "models": []}
    for name in models:
        out["models"].append(bench_model(name, list(threads), decode_tokens, prompt_tokens, dense, head,
                                         tune=tune, quant_spec=quant_spec, reps=reps, kv_dtype=kv_dtype))
    return out


# --------------------------------------------------------------------------- profile
@dataclass
class ProfileReport:
    """What :func:`profile_model` measured on the packed engine."""

    prompt_tokens: int
    decode_tokens: int
    prefill_s: float  # one prefill of the prompt
    decode_s: float  # per token, on the per-layer (torch) path, where the timer hooks run
    kernel_share: float  # fraction of a per-layer decode step spent in the ternary kernels + head
    sections: list[tuple[str, int, float, float]]  # LayerTimer.table(): (section, calls, total ms, mean us)
    trace: Path | None = None  # the Chrome trace written
    fused_decode_s: float | None = None  # per token on the fused C path (None: no fused path)
    fused_native_share: float | None = None  # fraction of a fused step in C (the rest: Python)
    fused_sections: list[dict] | None = None  # fused_profile(): per-section time, bytes, GB/s
    read_bw: float | None = None  # bytes/s, the ceiling fused_sections are measured against
    divergence: list[dict] | None = None  # LayerTracer.compare() packed vs dense fp32 (compare=True)


def profile_model(model: str | Path | None = None, *, preset: str = "125M", prompt_tokens: int = 32,
                  decode_tokens: int = 16, threads: int | None = None, trace: str | Path | None = None,
                  compare: bool = False) -> ProfileReport:
    """Per-section timing of the packed engine on ``model`` (a packed folder or registered name;
    None: a random packed model of ``preset``); a Chrome trace written to ``trace`` if given;
    ``compare``: per-layer activations of the packed engine vs the dense fp32 reference."""
    from tritlm.formats.packed import load_packed, random_packed
    from tritlm.infer.engine import Engine
    from tritlm.model.config import preset as preset_config
    from tritlm.registry import resolve_path

    if model:
        pm = load_packed(resolve_path(model))
    else:
        pm = random_packed(preset_config(preset, vocab_size=32000, max_seq_len=512))
    eng = Engine(pm, threads=threads, cache_len=pm.config.max_seq_len)  # no cache growth in a timed run
    prompt = [(5 * i) % pm.config.vocab_size for i in range(1, prompt_tokens + 1)]
    eng.prefill(prompt)  # warm-up
    eng.reset()
    timer = LayerTimer()
    eng.timer = timer
    t = time.perf_counter()
    logits = eng.prefill(prompt)
    t_pre = time.perf_counter() - t
    t = time.perf_counter()
    tok = int(logits.argmax())
    for _ in range(decode_tokens):
        tok = int(eng.forward_seq([tok])[-1].argmax())
    t_dec = (time.perf_counter() - t) / max(1, decode_tokens)
    eng.timer = None
    if trace is not None:
        timer.chrome_trace(str(trace))
    rep = ProfileReport(prompt_tokens, decode_tokens, t_pre, t_dec, kernel_share(eng), timer.table(),
                        Path(trace) if trace is not None else None)
    if eng.fused is not None:
        native: list[float] = []
        tps = _time_decode(eng, max(4, decode_tokens), native)
        rep.fused_decode_s, rep.fused_native_share = 1.0 / tps, native[0]
        rep.read_bw = read_bandwidth(eng.threads or torch.get_num_threads())
        rep.fused_sections = fused_profile(eng, max(8, decode_tokens), rep.read_bw)
    if compare:
        ids = prompt[:16]
        tr_p, tr_d = LayerTracer(), LayerTracer()
        eng.tracer = tr_p
        eng.logits(ids)
        dense = Engine(pm, backend="dense")
        dense.tracer = tr_d
        dense.logits(ids)
        rep.divergence = tr_p.compare(tr_d)
    return rep
