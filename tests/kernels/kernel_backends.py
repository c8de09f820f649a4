"""The kernel backends the tests run on this machine (shared by the kernel test files)."""

import pytest

from tritlm.kernels.cpu import build

LIB = build.load_library()
HAS_C = LIB is not None
HAS_AVX2 = HAS_C and bool(LIB.tt_has_avx2())
HAS_AVX512 = HAS_C and bool(LIB.tt_has_avx512vnni())

BACKENDS = [
    pytest.param("avx512", marks=pytest.mark.skipif(not HAS_AVX512,
                                                    reason="no AVX-512 VNNI (emulated: test_kernels_avx512)")),
    pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 / no compiled kernels")),
    pytest.param("portable", marks=pytest.mark.skipif(not HAS_C, reason="no compiled kernels")),
    "numpy",
]
