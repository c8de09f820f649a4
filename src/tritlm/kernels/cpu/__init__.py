"""CPU kernels for ternary, int8, int4 and binary weights: C (AMX, AVX-512 VNNI, AVX2, portable) compiled on
first use, numpy fallback."""

from .build import build_library, cache_dir, find_compiler, load_library
from .lowbit import BinaryLinearKernel, Int4LinearKernel, Int8LinearKernel
from .ops import (
    BACKENDS,
    LinearKernelBase,
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
    "BinaryLinearKernel",
    "Int4LinearKernel",
    "Int8LinearKernel",
    "LinearKernelBase",
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
