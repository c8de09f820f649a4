"""Per-shape tuning of the CPU kernel parameters, cached in a JSON file.

Tuned per (backend, N, K, M-bucket, threads, CPU model):

* M bucket ``"1"`` (decode GEMV): software-prefetch distance in bytes ahead of the weight stream
  and its hint (non-temporal or not);
* M buckets ``"2-15"`` and ``"16+"`` (GEMM): rows per panel (the weight panel a thread keeps in
  L2 while it walks all tokens in 2-row x 4-token register tiles).

:func:`tune` times each candidate a few times (median; for decode the caches are flushed before
each call so the weights come from DRAM, as in a real model) and stores the winner in
``$TRITLM_CACHE_DIR/autotune.json`` (default ``~/.cache/tritlm/autotune.json``).
:func:`lookup` (used by every :class:`~tritlm.kernels.cpu.TernaryLinearKernel` at construction)
only reads that file - nothing is ever timed implicitly.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from .cpu.build import cache_dir

__all__ = ["CANDIDATES", "cache_path", "clear_memo", "lookup", "tune"]

FORMAT_VERSION = 1
CANDIDATES = {
    0: [{"prefetch": 0}, {"prefetch": 2048, "nta": 0}]
    + [{"prefetch": p, "nta": 1} for p in (1024, 2048, 4096)],
    1: [{"panel_rows": r} for r in (8, 16, 32, 64)],
    2: [{"panel_rows": r} for r in (8, 16, 32, 64)],
}
_BUCKETS = ("1", "2-15", "16+")
_memo: dict = {"path": None, "mtime": None, "data": None}


def cache_path() -> Path:
    return cache_dir() / "autotune.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(backend: str, n: int, k: int, bucket: int, threads: int) -> str:
    return f"{backend}|n={n}|k={k}|m={_BUCKETS[bucket]}|t={threads}|cpu={_cpu_model()}"


def clear_memo() -> None:
    _memo.update(path=None, mtime=None, data=None)


def _load() -> dict:
    path = cache_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return {}
    if _memo["path"] == path and _memo["mtime"] == mtime:
        return _memo["data"]
    try:
        data = json.loads(path.read_text())
        entries = data.get("entries", {}) if data.get("version") == FORMAT_VERSION else {}
    except (OSError, ValueError, AttributeError):
        entries = {}
    _memo.update(path=path, mtime=mtime, data=entries)
    return entries


def _save(new: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = dict(_load())
    entries.update(new)
    fd, tmp = tempfile.mkstemp(prefix="autotune.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": FORMAT_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    clear_memo()


def lookup(n: int, k: int, threads: int, backend: str) -> dict | None:
    """Cached parameters ``{bucket: {...}}`` for this shape, or None if never tuned."""
    entries = _load()
    if not entries:
        return None
    out = {}
    for b in range(len(_BUCKETS)):
        e = entries.get(_key(backend, n, k, b, threads))
        if e:
            out[b] = {kk: int(v) for kk, v in e.items() if kk in ("prefetch", "panel_rows", "chunks", "nta")}
    return out or None


def _flush(buf: np.ndarray) -> None:
    buf.sum()  # read the whole buffer (clean lines): evicts the weights from every cache level


def tune(n: int, k: int, ms=(1, 128), threads: int | None = None, backend: str | None = None,
         candidates: dict | None = None, repeats: int = 5, save: bool = True,
         flush_bytes: int = 64 << 20, seed: int = 0) -> dict:
    """Time the candidates for each batch size in ``ms`` and return ``{bucket: best params}``.

    Random ternary weights of the given shape are used (the timing does not depend on values).
    """
    from .cpu.ops import TernaryLinearKernel, get_num_threads, m_bucket, resolve_backend

    backend = resolve_backend(backend)
    threads = int(threads or get_num_threads())
    cands = candidates or CANDIDATES
    rng = np.random.default_rng(seed)
    w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    kern = TernaryLinearKernel(w, 1.0, threads=threads, backend=backend, params={})
    flush = np.zeros(max(flush_bytes, 1) // 8, dtype=np.uint64) if flush_bytes else None
    best: dict = {}
    new_entries = {}
    for m in ms:
        b = m_bucket(int(m))
        if b in best or backend == "numpy":
            continue
        x = rng.standard_normal((int(m), k)).astype(np.float32)
        out = np.empty((int(m), n), dtype=np.float32)
        results = []
        for cand in cands[b]:
            kern.set_params({b: cand})
            kern(x, out=out)  # warm-up
            ts = []
            for _ in range(repeats):
                if flush is not None and b == 0:
                    _flush(flush)
                t0 = time.perf_counter()
                kern(x, out=out)
                ts.append(time.perf_counter() - t0)
            results.append((float(np.median(ts)), cand))
        t_best, c_best = min(results, key=lambda r: r[0])
        best[b] = dict(c_best)
        new_entries[_key(backend, n, k, b, threads)] = {**c_best, "us": round(t_best * 1e6, 1),
                                                        "tuned_at_m": int(m)}
    if save and new_entries:
        _save(new_entries)
    return best
