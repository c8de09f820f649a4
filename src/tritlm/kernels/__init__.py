"""Packing layouts and CPU kernels for ternary / binary weights.

``pack``       numpy bit packing (2-bit plain, I2_S-like kernel layout, base-3, 1-bit) with exact
               round trips; see its docstring for every layout.
``reference``  obvious numpy references (activation quantiser, integer matmul).
``cpu``        :class:`TernaryLinearKernel` (AVX2 / portable C, compiled on first use; numpy
               fallback), :func:`quantize_act`, :func:`set_num_threads`.
``autotune``   per-shape kernel parameter search cached in ``~/.cache/tritlm/autotune.json``.
"""

from .cpu import (
    TernaryLinearKernel,
    get_num_threads,
    kernel_info,
    quantize_act,
    set_num_threads,
)
from .pack import (
    PackedTernary,
    pack_2bit,
    pack_base3,
    pack_binary,
    pack_ternary_kernel,
    unpack_2bit,
    unpack_base3,
    unpack_binary,
    unpack_ternary_kernel,
)
from .reference import quantize_act_ref, ternary_matmul_int_ref, ternary_matmul_ref

__all__ = [
    "PackedTernary",
    "TernaryLinearKernel",
    "get_num_threads",
    "kernel_info",
    "pack_2bit",
    "pack_base3",
    "pack_binary",
    "pack_ternary_kernel",
    "quantize_act",
    "quantize_act_ref",
    "set_num_threads",
    "ternary_matmul_int_ref",
    "ternary_matmul_ref",
    "unpack_2bit",
    "unpack_base3",
    "unpack_binary",
    "unpack_ternary_kernel",
]
