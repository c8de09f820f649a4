"""fp16-weight matmul (LM head) against a float64 reference, on awkward sizes, both C routes."""

from __future__ import annotations

import pytest
import torch

from tritlm.kernels.cpu import build, set_num_threads
from tritlm.kernels.cpu.f16 import F16MatMul, f16_matmul_ref

pytestmark = pytest.mark.skipif(build.load_library() is None, reason="no C compiler: no compiled kernels")


def _check(got: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> None:
    ref = f16_matmul_ref(w, x)
    # float32 accumulation of K products: error bound relative to sum |w x|
    bound = (x.double().abs() @ w.double().abs().t()).float() * (x.shape[1] * 2.0 ** -23) + 1e-30
    assert ((got - ref).abs() <= bound).all()


# avx512: pairs of rows from the two halves of each chunk (two chunks a thread, 16 to 256 rows:
# 257 rows on 3 threads are 6 chunks of 43, odd chunks end on a single row), up to 8 tokens a pass
# (m 9: a second pass of one), K past the last 32 in scalar steps
@pytest.mark.parametrize("backend", ["avx512", "avx2", "portable"])
@pytest.mark.parametrize(("n", "k", "m"), [(1, 1, 1), (257, 100, 1), (300, 1536, 3), (1000, 17, 5), (513, 64, 9),
                                           (771, 1000, 8)])
@pytest.mark.parametrize("threads", [1, 3])
def test_f16_matmul_matches_float64(backend, n, k, m, threads):
    lib = build.load_library()
    if backend != "portable" and not lib.tt_has_f16c():
        pytest.skip("CPU without AVX2/F16C")
    if backend == "avx512" and not lib.tt_has_avx512vnni():
        pytest.skip("CPU without AVX-512 (VNNI)")
    g = torch.Generator().manual_seed(n * 31 + k * 7 + m)
    w = torch.randn(n, k, generator=g).half()
    x = torch.randn(m, k, generator=g) * 3
    set_num_threads(threads)
    try:
        _check(F16MatMul(w, threads=threads, backend=backend)(x), w, x)
    finally:
        set_num_threads(build.default_threads())


def test_f16_special_values_convert_exactly():
    """Subnormal, zero, negative zero and large halves: the portable converter is exact."""
    vals = torch.tensor([0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504.0, -65504.0, 1.0, -2.5], dtype=torch.float16)
    k = vals.numel()
    w = vals.view(1, k).repeat(3, 1)
    x = torch.eye(k)  # row t of the output is column t of w: the converted weights themselves
    for backend in ("portable", "avx2"):
        got = F16MatMul(w, backend=backend)(x)
        assert torch.equal(got, w.float().t())


def test_f16_shape_errors():
    mm = F16MatMul(torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"\[M, 8\]"):
        mm(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="out must be"):
        mm(torch.zeros(2, 8), torch.empty(2, 5))
