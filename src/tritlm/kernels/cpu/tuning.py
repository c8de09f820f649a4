"""The autotuning timing loop of the CPU kernels (the cache itself is ``kernels/autotune.py``)."""

from __future__ import annotations

import time

import numpy as np

from .. import autotune
from .ops import TernaryLinearKernel, get_num_threads, m_bucket, resolve_backend

# a candidate replaces the route's current parameters only when its median is this much faster
MARGIN = 0.05

# candidates per M bucket: GEMV (bucket 0) prefetch distance; GEMM (1, 2) rows per panel. No
# non-temporal hint (nta 1) among them: one call alone, cold, cannot tell it apart (a 1536 x 1536
# GEMV is ~25 us of weights under ~80 us of Python call, and it won that noise), but inside the
# decode step, where the next GEMV follows, it ran 700M's o_proj at 1.31 ms a token against 0.66
# with the default (45% -> 85% of the bandwidth ceiling)
CANDIDATES = {
    0: [{"prefetch": 0}] + [{"prefetch": p, "nta": 0} for p in (2048, 4096, 8192)],
    1: [{"panel_rows": r} for r in (8, 16, 32, 64)],
    2: [{"panel_rows": r} for r in (8, 16, 32, 64)],
}


def tune_kernel(kern, ms=(1, 128), threads: int | None = None, save: bool = True, *,
                candidates: dict | None = None, repeats: int = 5, flush_bytes: int = 64 << 20,
                seed: int = 0) -> dict:
    """Time the parameter candidates on kernel ``kern`` for each batch size in ``ms``; see
    :meth:`tritlm.kernels.cpu.ops.LinearKernelBase.tune`."""
    threads = int(threads or kern.effective_threads)
    if kern._ctx is None:
        return {}
    cands = candidates or CANDIDATES
    rng = np.random.default_rng(seed)
    flush = np.zeros(max(flush_bytes, 1) // 8, dtype=np.uint64) if flush_bytes else None
    saved_threads, saved_params = kern.threads, {b: dict(p) for b, p in kern.params.items()}
    best: dict = {}
    new_entries = {}
    try:
        kern.threads = threads
        for m in ms:
            b = m_bucket(int(m))
            if b in best:
                continue
            x = rng.standard_normal((int(m), kern.k)).astype(np.float32)
            out = np.empty((int(m), kern.n), dtype=np.float32)
            # the route's current values of the tuned keys compete too, and win unless a candidate is
            # clearly faster: on a shared machine the fastest median of a few calls is often noise
            keys = sorted({k for c in cands[b] for k in c})
            pool = [{k: saved_params[b][k] for k in keys}] + [dict(c) for c in cands[b]]
            ts: list[list[float]] = [[] for _ in pool]
            for cand in pool:
                kern.set_params({b: {**saved_params[b], **cand}})
                kern(x, out=out)  # warm-up
            for _ in range(repeats):  # interleaved: a slow second hits every candidate alike
                for i, cand in enumerate(pool):
                    kern.set_params({b: {**saved_params[b], **cand}})
                    if flush is not None and b == 0:
                        flush.sum()  # read a big buffer: evicts the weights from every cache level
                    t0 = time.perf_counter()
                    kern(x, out=out)
                    ts[i].append(time.perf_counter() - t0)
            med = [float(np.median(t)) for t in ts]
            i_best = min(range(len(pool)), key=med.__getitem__)
            if med[i_best] > (1.0 - MARGIN) * med[0]:
                i_best = 0
            t_best, c_best = med[i_best], pool[i_best]
            best[b] = dict(c_best)
            new_entries[autotune.key(kern.backend, kern.n, kern.k, b, threads, kern.kind)] = {
                **c_best, "us": round(t_best * 1e6, 1), "tuned_at_m": int(m)}
    finally:
        kern.threads = saved_threads
        kern.params = saved_params
        kern.set_params({})
    if save and new_entries:
        autotune.save(new_entries)
    kern.set_params(best)
    return best



def tune(n: int, k: int, ms=(1, 128), threads: int | None = None, backend: str | None = None,
         candidates: dict | None = None, repeats: int = 5, save: bool = True,
         flush_bytes: int = 64 << 20, seed: int = 0) -> dict:
    """Tune the ternary kernel of shape ``[n, k]`` for each batch size in ``ms`` and return
    ``{bucket: best params}``; random weights are used (the timing does not depend on values).
    Cached in ``autotune.json`` when ``save``.
    """
    backend = resolve_backend(backend)
    if backend == "numpy":
        return {}
    threads = int(threads or get_num_threads())
    w = np.random.default_rng(seed).integers(-1, 2, size=(n, k), dtype=np.int8)
    kern = TernaryLinearKernel(w, 1.0, threads=threads, backend=backend, params={})
    return kern.tune(ms=ms, threads=threads, save=save, candidates=candidates, repeats=repeats,
                     flush_bytes=flush_bytes, seed=seed)
