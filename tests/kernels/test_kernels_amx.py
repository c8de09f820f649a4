"""The AMX-INT8 route for ternary prompts: dispatch, and results bit-identical to the portable route.

Runs where the CPU has AMX-INT8 and the OS grants the tile state (the rest skip with the reason).
The references: int64 numpy dots of the unpacked weights, and the portable C route's float32
outputs compared bit for bit (the AMX epilogue repeats its IEEE double operations). The shapes
are awkward on purpose: rows not a multiple of the 32-row panel or the 4-row group, K not a
multiple of the 128-weight block, token counts around the 16-token tile and the 32-token block.
"""

from __future__ import annotations

import numpy as np
import pytest
from kernel_backends import HAS_AMX, HAS_C, LIB

from tritlm.kernels import TernaryLinearKernel, quantize_act_ref, ternary_matmul_int_ref

pytestmark = pytest.mark.skipif(not HAS_AMX, reason="no AMX-INT8 here (CPU, XCR0 or the OS's permission)")


def test_dispatch_matches_the_cpu_flags():
    if not HAS_C:
        pytest.skip("no compiled kernels")
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert {"amx_tile", "amx_int8"} <= flags
    k = TernaryLinearKernel(np.ones((8, 128), dtype=np.int8), backend="auto")
    assert k.backend == "amx" and LIB.tt_ctx_get_isa(k._ctx) == 3


# route -> (amx_min_m, few_min_m): every call of 1+ tokens through the activations-as-A tiles,
# or every call of 2+ tokens through the weights-as-A tiles (one pass up to 32, several beyond),
# or the defaults (2-3 tokens: the VNNI few-token GEMV, then the weights-as-A tiles up to 95 tokens
# at K <= 1536 (32 above), the activations-as-A ones from there: K 1000 and 300 at 70 tokens take
# the first, K 4096 + 5 at 33 tokens the second)
ROUTES = {"activations_as_a": (1, None), "weights_as_a": (1 << 20, 2), "default": None}


def _pair(rng, n, k, bias: bool, route: str = "activations_as_a"):
    w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    ws = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    amx = TernaryLinearKernel(w, ws, bias=b, backend="amx")
    if ROUTES[route] is not None:
        amx.set_amx_min_m(*ROUTES[route])
    ref = TernaryLinearKernel(w, ws, bias=b, backend="portable")
    return w, amx, ref


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("n,k", [(1, 1), (3, 127), (5, 129), (37, 300), (64, 128), (67, 640), (131, 1000), (260, 256),
                                 (1100, 300)])
def test_amx_is_bit_identical_to_portable(n, k, route):
    """Rows not a multiple of the 32-row panel, panels of one group, K not a multiple of the
    block, token counts around the tiles' 16 and the passes' 32 (and passes of 8, which have
    their own activation transpose); 1100 rows (275 groups): the
    single-token GEMV's spans of 128 groups paired half a span apart, an odd last span, and
    tile chunks whose halves end mid-panel."""
    rng = np.random.default_rng(n * 1000 + k)
    w, amx, ref = _pair(rng, n, k, bias=n % 2 == 1, route=route)
    for m in (1, 2, 3, 8, 15, 16, 17, 31, 32, 33, 40, 49, 70):  # 8, 40 = 32 + 8: the 8-token transpose
        x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 10)).astype(np.float32)
        xq, xs = quantize_act_ref(x)
        for th in (1, 2, 3):
            amx.threads = ref.threads = th
            assert np.array_equal(amx.int_dots(xq), ternary_matmul_int_ref(xq, w)), (m, th)
            assert np.array_equal(amx(x).view(np.int32), ref(x).view(np.int32)), (m, th)
            assert np.array_equal(amx.matmul_int8(xq, xs).view(np.int32), ref.matmul_int8(xq, xs).view(np.int32))


def test_the_route_thresholds_are_checked():
    amx = TernaryLinearKernel(np.ones((8, 128), dtype=np.int8), backend="amx")
    with pytest.raises(ValueError, match="few_min_m"):
        amx.set_amx_min_m(16, few_min_m=1)


def test_amx_extreme_activations_and_long_rows():
    rng = np.random.default_rng(1)
    for k in (4096 + 5, 8192):
        w = rng.integers(-1, 2, size=(40, k)).astype(np.int8)
        w[:8] = 1
        w[8:16] = -1
        amx = TernaryLinearKernel(w, 1.0, backend="amx", threads=2)
        for v in (-128, 127):
            xq = np.full((20, k), v, dtype=np.int8)
            assert np.array_equal(amx.int_dots(xq), ternary_matmul_int_ref(xq, w))
        xq = rng.choice(np.array([-128, 127], dtype=np.int8), size=(33, k))
        assert np.array_equal(amx.int_dots(xq), ternary_matmul_int_ref(xq, w))


def test_every_amx_route_gives_the_vnni_numbers():
    rng = np.random.default_rng(2)
    w = rng.integers(-1, 2, size=(70, 700)).astype(np.int8)
    amx = TernaryLinearKernel(w, 0.5, backend="amx", threads=2)
    vnni = TernaryLinearKernel(w, 0.5, backend="avx512", threads=2)
    for m in (1, 4, 15, 16, 40, 100):  # 1: the VNNI GEMV; 4-95 at this K: weights-as-A tiles; 96+: activations-as-A
        x = rng.standard_normal((m, 700)).astype(np.float32)
        assert np.array_equal(amx(x).view(np.int32), vnni(x).view(np.int32)), m
    with pytest.raises(ValueError, match="amx_min_m"):
        amx.set_amx_min_m(0)


def test_the_workspace_grows_and_shrinking_calls_reuse_it():
    """A call with many tokens after few (and few after many) reads only its own tokens."""
    rng = np.random.default_rng(3)
    w, amx, ref = _pair(rng, 96, 384, bias=True)
    for m in (17, 200, 18, 64, 1):
        x = rng.standard_normal((m, 384)).astype(np.float32)
        assert np.array_equal(amx(x).view(np.int32), ref(x).view(np.int32)), m


def test_other_kinds_under_the_amx_backend_run_vnni():
    import torch

    from tritlm.kernels.cpu.lowbit import BinaryLinearKernel, Int8LinearKernel

    i8 = Int8LinearKernel(torch.randint(-127, 128, (8, 64), dtype=torch.int8), 1.0, backend="amx")
    b1 = BinaryLinearKernel(torch.randint(0, 2, (8, 128), dtype=torch.int8) * 2 - 1, 1.0, backend="amx")
    for k in (i8, b1):
        assert k.backend == "avx512" and LIB.tt_ctx_get_isa(k._ctx) == 2
