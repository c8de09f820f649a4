"""CPU ternary kernels: C (AVX2 ``maddubs`` + portable loops) compiled on first use, numpy fallback."""

from .build import build_library, cache_dir, find_compiler, load_library
from .ops import (
    BACKENDS,
    TernaryLinearKernel,
    get_num_threads,
    kernel_info,
    quantize_act,
    resolve_backend,
    set_min_chunk_blocks,
    set_num_threads,
    set_spin_us,
)

__all__ = [
    "BACKENDS",
    "TernaryLinearKernel",
    "build_library",
    "cache_dir",
    "find_compiler",
    "get_num_threads",
    "kernel_info",
    "load_library",
    "quantize_act",
    "resolve_backend",
    "set_min_chunk_blocks",
    "set_num_threads",
    "set_spin_us",
]
