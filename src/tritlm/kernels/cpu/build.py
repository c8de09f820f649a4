"""Compile-on-first-use of the C kernels (``tritlm_cpu.c``) and loading them with ctypes.

Route: the first time the kernels are needed, the system C compiler (``$TRITLM_CC``, else ``$CC``,
else ``cc``/``gcc``/``clang`` on PATH) builds ``tritlm_cpu.c`` into a shared library in
``$TRITLM_CACHE_DIR/kernels/`` (default ``~/.cache/tritlm/kernels/``) named by a hash of the
source, the compiler, the flags and the machine; later processes load it directly (~1 ms). No
binary is ever downloaded. A build goes to a temporary file that is atomically renamed, so
concurrent first uses are safe. If no compiler works, :func:`load_library` returns ``None`` and
the callers fall back to numpy (with a logged warning).

The AVX2 code is compiled with per-function ``target("avx2,fma")`` attributes and chosen at run
time (``__builtin_cpu_supports``), so the library never uses ``-march=native`` and stays valid on
any x86-64 (and builds on non-x86 CPUs with only the portable C loops).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("tritlm.kernels")

ABI_VERSION = 15
SOURCE = Path(__file__).with_name("tritlm_cpu.c")
# files SOURCE #includes: part of the cache key, so editing any of them triggers a rebuild
INCLUDED = tuple(Path(__file__).with_name(f)
                 for f in ("tritlm_intk.c", "tritlm_decode.c", "tritlm_f16.c", "tritlm_avx512.c", "tritlm_amx.c"))
CFLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno"]
LDFLAGS = ["-lm"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_tried = False
_lib_error: str | None = None


def cache_dir() -> Path:
    """Root cache folder: ``$TRITLM_CACHE_DIR`` or ``~/.cache/tritlm``."""
    env = os.environ.get("TRITLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tritlm"


def find_compiler() -> str | None:
    for cand in (os.environ.get("TRITLM_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if not cand:
            continue
        exe = shutil.which(cand.split()[0])
        if exe:
            return exe
    return None


def _key(source: bytes, cc: str) -> str:
    h = hashlib.sha256()
    for part in (source, cc.encode(), " ".join(CFLAGS + LDFLAGS).encode(), platform.machine().encode(),
                 sys.platform.encode(), str(ABI_VERSION).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def library_path(cc: str | None = None, root: Path | None = None) -> Path | None:
    """Where the library for the current source/compiler lives (whether built or not)."""
    cc = cc or find_compiler()
    if cc is None or not SOURCE.exists():
        return None
    root = root or cache_dir()
    src = SOURCE.read_bytes() + b"".join(p.read_bytes() for p in INCLUDED if p.exists())
    return root / "kernels" / f"tritlm_cpu-{_key(src, cc)}.so"


def build_library(root: Path | None = None, force: bool = False, cc: str | None = None) -> Path:
    """Compile the kernels (if not already in the cache) and return the library path.

    Raises RuntimeError with the compiler output when the build fails.
    """
    cc = cc or find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set TRITLM_CC or CC, or install gcc/clang)")
    for src in (SOURCE, *INCLUDED):
        if not src.exists():
            raise RuntimeError(f"kernel source {src} is missing from the installed package")
    out = library_path(cc, root)
    assert out is not None
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *CFLAGS, "-o", tmp, str(SOURCE), *LDFLAGS]
    try:
        res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"kernel build failed ({' '.join(cmd)}):\n{res.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built tritlm CPU kernels: %s", out)
    _prune(out)
    return out


def _prune(keep: Path, max_age_days: float = 14.0) -> None:
    """Drop libraries of other source versions unused for `max_age_days` (rebuilt if needed)."""
    now = time.time()
    for p in keep.parent.glob("tritlm_cpu-*.so"):
        try:
            age = now - p.stat().st_mtime
            if p != keep and (age > max_age_days * 86400 or (p.name.endswith(".tmp.so") and age > 3600)):
                p.unlink()
        except OSError:
            pass


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    vp, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    sig = {
        "tt_abi_version": (i32, []),
        "tt_has_avx2": (i32, []),
        "tt_has_avx512vnni": (i32, []),
        "tt_has_amx": (i32, []),
        "tt_set_num_threads": (None, [i32]),
        "tt_get_num_threads": (i32, []),
        "tt_set_spin_us": (None, [i32]),
        "tt_set_min_chunk_blocks": (None, [i32]),
        "tt_pool_selftest": (i32, [i32, i32, i32]),
        "tt_ctx_new": (vp, [vp, i32, i32, i32, vp, vp]),
        "tt_ctx_new_int8": (vp, [vp, i32, i32, i32, vp, vp]),
        "tt_ctx_new_int4": (vp, [vp, i32, i32, i32, i32, vp, vp]),
        "tt_ctx_new_binary": (vp, [vp, i32, i32, i32, vp, vp]),
        "tt_ctx_get_kind": (i32, [vp]),
        "tt_ctx_free": (None, [vp]),
        "tt_ctx_set_isa": (i32, [vp, i32]),
        "tt_ctx_set_amx_min_m": (None, [vp, i32]),
        "tt_ctx_set_weights": (None, [vp, vp]),
        "tt_ctx_set_amxs_min_m": (None, [vp, i32]),
        "tt_ctx_get_isa": (i32, [vp]),
        "tt_ctx_set_params": (None, [vp, i32, i32, i32, i32, i32]),
        "tt_forward_f32": (i32, [vp, vp, i32, i64, vp, i32]),
        "tt_forward_i8": (i32, [vp, vp, i32, i64, vp, vp, vp, i32]),
        "tt_quantize": (None, [vp, i32, i32, i64, vp, i64, i32, vp, vp, i32]),
        "tt_dec_new": (vp, [i32, i32, i32, i32, i32, i32, i32, i32, i32, f32, f32, i32, i32, vp, vp, vp, i32]),
        "tt_dec_free": (None, [vp]),
        "tt_dec_set_layer": (i32, [vp, i32, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp]),
        "tt_dec_step": (i32, [vp, vp, i32, i32, vp, i32]),
        "tt_dec_step_batch": (i32, [vp, vp, i32, vp, vp, vp, i32]),
        "tt_dec_forward_rows": (i32, [vp, vp, i32, vp, vp, vp, i32]),
        "tt_dec_set_embed": (i32, [vp, vp, i32, i64]),
        "tt_dec_step_ids": (i32, [vp, vp, i32, vp, vp, vp, i32]),
        "tt_dec_forward_rows_ids": (i32, [vp, vp, i32, vp, vp, vp, i32]),
        "tt_dec_set_profile": (None, [vp, i32]),
        "tt_dec_get_profile": (i32, [vp, vp]),
        "tt_has_f16c": (i32, []),
        "tt_f16_matmul": (i32, [vp, i32, i32, vp, i32, i64, vp, i32, i32]),
        "tt_f32_to_f16": (i32, [vp, vp, i64, i32]),
        "tt_f16_to_f32": (i32, [vp, vp, i64]),
        "tt_f32_to_q8_rows": (i32, [vp, vp, i64, i32, i32]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    return lib


def _open(path: Path) -> ctypes.CDLL:
    lib = _declare(ctypes.CDLL(str(path)))
    if lib.tt_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI version {lib.tt_abi_version()} != {ABI_VERSION}")
    try:
        os.utime(path)  # mark as used, so _prune keeps it
    except OSError:
        pass
    return lib


def load_library(force_rebuild: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel library (built on first use), or None when it cannot be built."""
    global _lib, _lib_tried, _lib_error
    with _lock:
        if _lib is not None and not force_rebuild:
            return _lib
        if _lib_tried and not force_rebuild:
            return None
        _lib_tried = True
        try:
            try:
                path = build_library(force=force_rebuild)
            except OSError:  # cache folder not writable: build into a private temp folder
                path = build_library(root=Path(tempfile.mkdtemp(prefix="tritlm-")), force=True)
            try:
                lib = _open(path)
            except OSError:  # truncated / foreign file in the cache: rebuild once
                lib = _open(build_library(force=True))
        except Exception as e:  # noqa: BLE001 - any failure means "no compiled kernels"
            _lib_error = str(e)
            log.warning("tritlm: compiled CPU kernels unavailable, using the slow numpy fallback (%s)", e)
            return None
        _lib, _lib_error = lib, None
        n = os.environ.get("TRITLM_NUM_THREADS")
        lib.tt_set_num_threads(int(n) if n else default_threads())
        spin = os.environ.get("TRITLM_SPIN_US")
        if spin:
            lib.tt_set_spin_us(int(spin))
        return _lib


def load_error() -> str | None:
    """Why :func:`load_library` returned None (None if it did not fail)."""
    return _lib_error


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
