"""The cache of tuned CPU kernel parameters: one JSON file, read / written / looked up here.

Entries are keyed by (backend, N, K, M-bucket, threads, CPU model, weight kind):

* M bucket ``"1"`` (decode GEMV): software-prefetch distance in bytes ahead of the weight stream
  and its hint (non-temporal or not);
* M buckets ``"2-15"`` and ``"16+"`` (GEMM): rows per panel (the weight panel a thread keeps in
  L2 while it walks all tokens in register tiles).

The file is ``$TRITLM_CACHE_DIR/autotune.json`` (default ``~/.cache/tritlm/autotune.json``).
:func:`lookup` (used by every kernel object at construction) only reads it - nothing is ever
timed implicitly. The timing loop lives with the kernels:
:meth:`tritlm.kernels.cpu.ops.LinearKernelBase.tune` and :func:`tritlm.kernels.cpu.tuning.tune`
This module imports no kernel code.
"""

from __future__ import annotations

import json
from pathlib import Path

from tritlm.io_atomic import write_json_atomic
from tritlm.sysinfo import cpu_name

from .cpu.build import cache_dir

__all__ = ["FORMAT_VERSION", "cache_path", "clear_memo", "key", "lookup", "save"]

# 2: caches of version 1 may hold the non-temporal GEMV hint that the tuner no longer offers
# (kernels/cpu/tuning.py CANDIDATES); they are ignored, so an old cache cannot keep it
FORMAT_VERSION = 2
PARAM_NAMES = ("prefetch", "panel_rows", "chunks", "nta")
_BUCKETS = ("1", "2-15", "16+")
_memo: dict = {"path": None, "mtime": None, "data": None}


def cache_path() -> Path:
    return cache_dir() / "autotune.json"


def key(backend: str, n: int, k: int, bucket: int, threads: int, kind: str = "ternary") -> str:
    """The cache key of one entry (ternary keys carry no kind, as before kinds existed)."""
    base = f"{backend}|n={n}|k={k}|m={_BUCKETS[bucket]}|t={threads}|cpu={cpu_name()}"
    return base if kind == "ternary" else f"{base}|kind={kind}"




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


def save(new: dict) -> None:
    """Merge ``{key: entry}`` into the cache file (atomic replace)."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = dict(_load())
    entries.update(new)
    write_json_atomic(path, {"version": FORMAT_VERSION, "entries": entries}, indent=1, sort_keys=True)
    clear_memo()




def lookup(n: int, k: int, threads: int, backend: str, kind: str = "ternary") -> dict | None:
    """Cached parameters ``{bucket: {...}}`` for this shape, or None if never tuned."""
    entries = _load()
    if not entries:
        return None
    out = {}
    for b in range(len(_BUCKETS)):
        e = entries.get(key(backend, n, k, b, threads, kind))
        if e:
            out[b] = {kk: int(v) for kk, v in e.items() if kk in PARAM_NAMES}
    return out or None
