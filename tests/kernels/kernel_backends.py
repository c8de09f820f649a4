"""The kernel backends the tests run on this machine (shared by the kernel test files)."""

import pytest

from tritlm.kernels.cpu import build

LIB = build.load_library()
HAS_C = LIB is not None
HAS_AVX2 = HAS_C and bool(LIB.tt_has_avx2())
HAS_AVX512 = HAS_C and bool(LIB.tt_has_avx512vnni())
HAS_AMX = HAS_C and bool(LIB.tt_has_amx())

BACKENDS = [
    pytest.param("amx", marks=pytest.mark.skipif(not HAS_AMX, reason="no AMX-INT8 (CPU, XCR0 or the OS's permission)")),
    pytest.param("avx512", marks=pytest.mark.skipif(not HAS_AVX512,
                                                    reason="no AVX-512 VNNI (emulated: test_kernels_avx512)")),
    pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 / no compiled kernels")),
    pytest.param("portable", marks=pytest.mark.skipif(not HAS_C, reason="no compiled kernels")),
    "numpy",
]
# the int8 / int4 / binary kinds have no AMX route (backend "amx" gives them VNNI: BACKENDS[1])
LOWBIT_BACKENDS = BACKENDS[1:]
