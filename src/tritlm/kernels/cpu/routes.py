"""The CPU kernel routes (amx / avx512 / avx2 / portable / numpy): which one runs here
(``$TRITLM_KERNEL`` or CPUID), each route's default parameters and M buckets, and the settings of
the C thread pool. The kernel objects that use them are in :mod:`.ops`."""

from __future__ import annotations

import logging
import os
import threading

from . import build

log = logging.getLogger("tritlm.kernels")

BACKENDS = ("auto", "amx", "avx512", "avx2", "portable", "numpy")
# backends that run the AVX2 code where they have no route of their own
AVX2_BACKENDS = ("avx2", "avx512", "amx")
# tt_ctx_set_isa codes, and the backend each code names
ISA_CODES = {"amx": 3, "avx512": 2, "avx2": 1, "portable": 0}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}
# M buckets of the tuned parameters (same as the C side): 0: M == 1, 1: 2 <= M < 16, 2: M >= 16
BUCKETS = ("1", "2-15", "16+")
DEFAULT_PARAMS = {"prefetch": 2048, "panel_rows": 32, "chunks": 8, "nta": 1}
# the ternary VNNI GEMV (routes avx512 / amx): measured on a 2-core Sapphire Rapids VM, weights
# streamed from DRAM, 2 threads: no prefetch 11.5-15.6 GB/s, 2 KiB non-temporal (the AVX2 default,
# tuned on Zen3) 12.6-14.9, 6-8 KiB into all levels 16.8-22.7 of ~28
VNNI_DEFAULT_PARAMS = {**DEFAULT_PARAMS, "prefetch": 8192, "nta": 0}

_py_threads = None
_threads_lock = threading.Lock()


def m_bucket(m: int) -> int:
    return 0 if m <= 1 else (1 if m < 16 else 2)


# --------------------------------------------------------------------------- global settings
def set_num_threads(n: int) -> None:
    """Default number of threads for every kernel call (the caller's thread included)."""
    global _py_threads
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    with _threads_lock:
        _py_threads = n
        lib = build.load_library()
        if lib is not None:
            lib.tt_set_num_threads(n)


def get_num_threads() -> int:
    lib = build.load_library()
    if lib is not None:
        return int(lib.tt_get_num_threads())
    return _py_threads or build.default_threads()


def set_spin_us(us: int) -> None:
    """How long idle worker threads spin (waiting for the next call) before they sleep."""
    lib = build.load_library()
    if lib is not None:
        lib.tt_set_spin_us(int(us))


def set_min_chunk_blocks(blocks: int) -> None:
    """Smallest unit of GEMV work handed to a thread, in row x 128-weight blocks (32 bytes each).

    Default 256 (8 KiB of weights), so tiny matrices stay on one thread; tests set 1 to force
    many chunks and multi-threaded splits on tiny matrices.
    """
    lib = build.load_library()
    if lib is not None:
        lib.tt_set_min_chunk_blocks(int(blocks))


def resolve_backend(requested: str | None = None) -> str:
    """Map a requested backend (or ``$TRITLM_KERNEL``) to the one that will actually run."""
    req = (requested or os.environ.get("TRITLM_KERNEL") or "auto").lower()
    if req not in BACKENDS:
        raise ValueError(f"unknown kernel backend {req!r}; choose one of {BACKENDS}")
    if req == "numpy":
        return "numpy"
    lib = build.load_library()
    if lib is None:
        return "numpy"
    has_avx2 = bool(lib.tt_has_avx2())
    if req == "portable":
        return "portable"
    if req in ("auto", "amx") and has_avx2 and lib.tt_has_amx():
        return "amx"
    if req == "amx":
        log.warning("tritlm: AMX kernels requested but the CPU (or its OS) lacks AMX-INT8; using the "
                    "next route")
    if req in ("auto", "avx512", "amx") and has_avx2 and lib.tt_has_avx512vnni():
        return "avx512"
    if req == "avx512":
        log.warning("tritlm: AVX-512 VNNI kernels requested but the CPU (or its OS) lacks them; using %s",
                    "AVX2" if has_avx2 else "portable C")
    if req == "avx2" and not has_avx2:
        log.warning("tritlm: AVX2 kernels requested but the CPU lacks AVX2/FMA; using portable C")
    return "avx2" if has_avx2 else "portable"


def kernel_info() -> dict:
    """Which backend runs here ($TRITLM_KERNEL, else "auto"), and what the CPU offers."""
    lib = build.load_library()
    return {
        "backend": resolve_backend(None),
        "avx2": bool(lib.tt_has_avx2()) if lib is not None else None,
        "avx512_vnni": bool(lib.tt_has_avx512vnni()) if lib is not None else None,
        "amx": bool(lib.tt_has_amx()) if lib is not None else None,
        "library": str(build.library_path()) if lib is not None else None,
        "compiler": build.find_compiler(),
        "threads": get_num_threads(),
        "error": build.load_error(),
    }
