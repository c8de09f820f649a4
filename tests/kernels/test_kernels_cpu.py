"""CPU kernels (AVX2, portable C, numpy fallback) against the int64 / float64 references."""

import logging
import os
import threading

import numpy as np
import pytest
from kernel_backends import BACKENDS, HAS_C

from tritlm.kernels import (
    TernaryLinearKernel,
    pack_ternary_kernel,
    quantize_act,
    quantize_act_ref,
    ternary_matmul_int_ref,
    ternary_matmul_ref,
)
from tritlm.kernels.cpu import build, ops

KS = [1, 127, 129, 300]
NS = [1, 3, 5, 67, 131]  # 131 rows: several 8-group blocks of the small-M GEMV, and a remainder
MS = [1, 2, 3, 4, 7, 8, 9, 33]  # 2 and up: the GEMM tiles (VNNI: runs of up to 8 tokens, 9 = 5 + 4)
THREADS = [1, 2, 3]


@pytest.fixture(autouse=True, scope="module")
def _split_tiny_work():
    """Let every thread get work even on tiny matrices, so thread splits are exercised."""
    ops.set_min_chunk_blocks(1)
    yield
    ops.set_min_chunk_blocks(256)


def _rel_close(y, ref, rtol=1e-6):
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert y.shape == ref.shape
    err = np.abs(y - ref)
    assert np.all(err <= rtol * np.abs(ref) + 1e-30), f"max rel err {np.max(err / (np.abs(ref) + 1e-30))}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", KS)
def test_kernels_match_reference(backend, k):
    rng = np.random.default_rng(k)
    for n in NS:
        w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
        ws = np.float32(rng.uniform(0.1, 2.0))
        kern = TernaryLinearKernel(w, ws, backend=backend)
        assert kern.backend == backend
        for m in MS:
            xq = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
            xs = rng.uniform(0.5, 50.0, size=m).astype(np.float32)
            x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 10)).astype(np.float32)
            dots_ref = ternary_matmul_int_ref(xq, w)
            q, s = quantize_act_ref(x)
            y_ref = ternary_matmul_ref(q, s, w, ws)
            for th in THREADS:
                kern.threads = th
                assert np.array_equal(kern.int_dots(xq), dots_ref), (n, m, th)
                _rel_close(kern.matmul_int8(xq, xs), ternary_matmul_ref(xq, xs, w, ws))
                _rel_close(kern(x), y_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int16_accumulation_extremes(backend):
    # every x = -128 with w = +1 reaches exactly -32768 per int16 lane over 16 blocks
    for k in (2048, 2048 + 128, 4096 + 5):
        w = np.ones((8, k), dtype=np.int8)
        w[4:] = -1
        kern = TernaryLinearKernel(w, 1.0, backend=backend, threads=2)
        for v in (-128, 127):
            xq = np.full((3, k), v, dtype=np.int8)
            assert np.array_equal(kern.int_dots(xq), ternary_matmul_int_ref(xq, w))
        xq = np.random.default_rng(0).choice(np.array([-128, 127], dtype=np.int8), size=(5, k))
        assert np.array_equal(kern.int_dots(xq), ternary_matmul_int_ref(xq, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_realistic_shape(backend):
    rng = np.random.default_rng(7)
    n, k = 260, 4096 + 64
    w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    ws = rng.uniform(0.5, 1.5, size=n).astype(np.float32)  # per-row scales
    bias = rng.standard_normal(n).astype(np.float32)
    kern = TernaryLinearKernel(w, ws, bias=bias, backend=backend, threads=2)
    for m in (1, 5, 20):
        x = rng.standard_normal((m, k)).astype(np.float32)
        q, s = quantize_act_ref(x)
        ref = (ternary_matmul_ref(q, s, w, ws) + bias).astype(np.float32)
        np.testing.assert_allclose(kern(x), ref, rtol=1e-6, atol=1e-5)
        assert np.array_equal(kern.int_dots(q), ternary_matmul_int_ref(q, w))


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
@pytest.mark.parametrize("panel_rows", [4, 8, 64])
@pytest.mark.parametrize("prefetch", [0, 4096])
@pytest.mark.parametrize("nta", [0, 1])
def test_params_do_not_change_results(panel_rows, prefetch, nta):
    rng = np.random.default_rng(3)
    w = rng.integers(-1, 2, size=(70, 700)).astype(np.int8)
    p = {"prefetch": prefetch, "panel_rows": panel_rows, "nta": nta, "chunks": 3}
    kern = TernaryLinearKernel(w, 1.0, params={0: p, 1: p, 2: p}, threads=2)
    for m in (1, 6, 17):
        xq = rng.integers(-128, 128, size=(m, 700)).astype(np.int8)
        assert np.array_equal(kern.int_dots(xq), ternary_matmul_int_ref(xq, w))


@pytest.mark.parametrize("backend", ["avx2", "portable", "numpy"])
def test_quantizer_matches_reference_bit_exact(backend):
    if backend != "numpy" and not HAS_C:
        pytest.skip("no compiled kernels")
    rng = np.random.default_rng(11)
    for k in (1, 7, 31, 32, 33, 100, 4096):
        x = (rng.standard_normal((5, k)) * rng.uniform(1e-3, 1e3)).astype(np.float32)
        x[1] = 0.0  # zero row: finite scale, all-zero codes
        x[2, 0] = 1.0
        x[2, 1:] = np.float32(0.5) / np.float32(127.0)  # near .5 ties after scaling
        q, s = quantize_act(x, backend=backend)
        qr, sr = quantize_act_ref(x)
        assert np.array_equal(q, qr) and np.array_equal(s, sr)
        assert np.all(q[1] == 0) and np.isfinite(s[1])


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
def test_torch_inputs_and_shapes():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    w = rng.integers(-1, 2, size=(33, 200)).astype(np.int8)
    kern = TernaryLinearKernel(torch.from_numpy(w), torch.tensor(0.25))
    x = torch.randn(2, 3, 200)
    y = kern(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 33) and y.dtype == torch.float32
    q, s = quantize_act_ref(x.reshape(6, 200).numpy())
    ref = ternary_matmul_ref(q, s, w, 0.25).reshape(2, 3, 33)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-6)
    # 1-D, non-contiguous, other dtypes, requires_grad, preallocated out
    np.testing.assert_allclose(kern(x[0, 0]).numpy(), ref[0, 0], rtol=1e-6)
    xt = torch.randn(200, 4).t()
    q, s = quantize_act_ref(xt.contiguous().numpy())
    np.testing.assert_allclose(kern(xt).numpy(), ternary_matmul_ref(q, s, w, 0.25), rtol=1e-6)
    xd = x.double().requires_grad_(True)
    np.testing.assert_allclose(kern(xd).numpy(), ref, rtol=1e-6)
    out = torch.empty(2, 3, 33)
    assert kern(x, out=out) is out
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)
    xn = x.numpy()
    outn = np.empty((2, 3, 33), dtype=np.float32)
    assert kern(xn, out=outn) is outn
    np.testing.assert_allclose(outn, ref, rtol=1e-6)
    assert kern(np.zeros((0, 200), dtype=np.float32)).shape == (0, 33)


def test_errors():
    w = np.zeros((4, 16), dtype=np.int8)
    kern = TernaryLinearKernel(w, 1.0)
    with pytest.raises(ValueError, match="16"):
        kern(np.zeros((2, 15), dtype=np.float32))
    with pytest.raises(ValueError, match="int8"):
        kern.matmul_int8(np.zeros((2, 16), dtype=np.int16), np.ones(2, dtype=np.float32))
    with pytest.raises(ValueError, match="x_scale"):
        kern.matmul_int8(np.zeros((2, 16), dtype=np.int8), np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="out"):
        kern(np.zeros((2, 16), dtype=np.float32), out=np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="w_scale"):
        TernaryLinearKernel(w, np.ones(3))
    with pytest.raises(ValueError, match="bias"):
        TernaryLinearKernel(w, 1.0, bias=np.ones(5))
    with pytest.raises(ValueError, match="backend"):
        TernaryLinearKernel(w, 1.0, backend="cuda")
    with pytest.raises(ValueError):
        TernaryLinearKernel(np.full((2, 2), 2, dtype=np.int8))


def test_accepts_packed_weights():
    rng = np.random.default_rng(2)
    w = rng.integers(-1, 2, size=(9, 140)).astype(np.int8)
    xq = rng.integers(-128, 128, size=(3, 140)).astype(np.int8)
    for il in (1, 4):
        kern = TernaryLinearKernel(pack_ternary_kernel(w, interleave=il), 1.0)
        assert np.array_equal(kern.int_dots(xq), ternary_matmul_int_ref(xq, w))


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
def test_global_threads_and_concurrent_callers():
    rng = np.random.default_rng(9)
    w = rng.integers(-1, 2, size=(128, 1024)).astype(np.int8)
    kern = TernaryLinearKernel(w, 1.0)
    old = ops.get_num_threads()
    try:
        xs = [rng.integers(-128, 128, size=(m, 1024)).astype(np.int8) for m in (1, 3, 9, 1)]
        refs = [ternary_matmul_int_ref(x, w) for x in xs]
        for t in (1, 3, 2):
            ops.set_num_threads(t)
            assert ops.get_num_threads() == t
            for x, r in zip(xs, refs):
                assert np.array_equal(kern.int_dots(x), r)
        errors = []

        def worker(i):
            for _ in range(30):
                j = (i + _) % len(xs)
                if not np.array_equal(kern.int_dots(xs[j]), refs[j]):
                    errors.append(i)

        ths = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        [t.start() for t in ths]
        [t.join() for t in ths]
        assert not errors
    finally:
        ops.set_num_threads(old)
    with pytest.raises(ValueError):
        ops.set_num_threads(0)


@pytest.mark.skipif(not HAS_C or not hasattr(os, "fork"), reason="needs compiled kernels and fork")
def test_threads_survive_fork():
    rng = np.random.default_rng(4)
    w = rng.integers(-1, 2, size=(64, 512)).astype(np.int8)
    kern = TernaryLinearKernel(w, 1.0, threads=2)
    xq = rng.integers(-128, 128, size=(1, 512)).astype(np.int8)
    ref = ternary_matmul_int_ref(xq, w)
    assert np.array_equal(kern.int_dots(xq), ref)  # pool threads exist now
    pid = os.fork()
    if pid == 0:  # child: the pool must be re-created, not waited on
        ok = np.array_equal(kern.int_dots(xq), ref)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_forced_numpy_fallback(monkeypatch, caplog, tmp_path):
    """No compiler -> load_library() is None, a warning is logged and numpy is used."""
    monkeypatch.setattr(build, "_lib", None)
    monkeypatch.setattr(build, "_lib_tried", False)
    monkeypatch.setattr(build, "_lib_error", None)
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    monkeypatch.setenv("TRITLM_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="tritlm.kernels"):
        assert build.load_library() is None
    assert "numpy fallback" in caplog.text
    assert ops.resolve_backend("auto") == "numpy"
    assert ops.resolve_backend("avx2") == "numpy"
    rng = np.random.default_rng(6)
    w = rng.integers(-1, 2, size=(5, 129)).astype(np.int8)
    kern = TernaryLinearKernel(w, 0.5)
    assert kern.backend == "numpy"
    x = rng.standard_normal((3, 129)).astype(np.float32)
    q, s = quantize_act_ref(x)
    _rel_close(kern(x), ternary_matmul_ref(q, s, w, 0.5))


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("TRITLM_KERNEL", "numpy")
    assert TernaryLinearKernel(np.zeros((2, 3), dtype=np.int8)).backend == "numpy"
    if HAS_C:
        monkeypatch.setenv("TRITLM_KERNEL", "portable")
        assert TernaryLinearKernel(np.zeros((2, 3), dtype=np.int8)).backend == "portable"
    monkeypatch.setenv("TRITLM_KERNEL", "bogus")
    with pytest.raises(ValueError):
        ops.resolve_backend()


@pytest.mark.parametrize("backend", BACKENDS)
def test_copy_and_pickle_rebuild_the_context(backend):
    import copy
    import pickle

    rng = np.random.default_rng(8)
    w = rng.integers(-1, 2, size=(20, 150)).astype(np.int8)
    kern = TernaryLinearKernel(w, 0.3, bias=np.arange(20, dtype=np.float32), backend=backend, threads=2)
    x = rng.standard_normal((3, 150)).astype(np.float32)
    y = kern(x)
    for other in (copy.deepcopy(kern), pickle.loads(pickle.dumps(kern))):
        assert other.backend == kern.backend and other.threads == 2
        if kern._ctx is not None:
            assert other._ctx != kern._ctx
        assert np.array_equal(other(x), y)
    del kern
    import gc

    gc.collect()


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
@pytest.mark.timeout(120)
def test_pool_stress_switching_threads_and_spin():
    """Thousands of tiny calls while thread counts, pool size and spin time change: no race."""
    rng = np.random.default_rng(12)
    cases = []
    for n, k in [(67, 300), (256, 512), (9, 129)]:
        w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
        kern = TernaryLinearKernel(w, 1.0)
        xs = []
        for m in (1, 2, 5):
            xq = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
            xs.append((xq, ternary_matmul_int_ref(xq, w)))
        cases.append((kern, xs))
    old = ops.get_num_threads()
    try:
        for it in range(3000):
            kern, xs = cases[it % 3]
            xq, ref = xs[it % 2 if it % 7 else 2]
            kern.threads = (2, 3, 1, 2, 4)[it % 5]
            if it % 397 == 0:
                ops.set_num_threads((2, 3, 1)[it % 3])
            if it % 500 == 0:
                ops.set_spin_us((0, 100, 5)[it % 3])
            assert np.array_equal(kern.int_dots(xq), ref), it
    finally:
        ops.set_num_threads(old)
        ops.set_spin_us(100)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 6, 9])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_output_is_bit_exact_with_per_row_scales(backend, m, with_bias):
    """out = float32(float64(dot) * w_scale[row] * (1 / x_scale)) (+ float32 bias): the vector
    epilogues (4 rows in the AVX2 GEMV, 16 in the AVX-512 and AMX routes) do the same IEEE double
    operations as the scalar one and numpy here, so results are identical bits."""
    rng = np.random.default_rng(7 + m)
    n, k = 67, 300
    w = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    ws = rng.uniform(0.01, 3.0, size=n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    kern = TernaryLinearKernel(w, ws, bias, backend=backend)
    x = rng.standard_normal((m, k)).astype(np.float32)
    xq, xs = quantize_act_ref(x)
    dots = ternary_matmul_int_ref(xq, w).astype(np.float64)
    want = (dots * ws.astype(np.float64) * (1.0 / xs.astype(np.float64))[:, None]).astype(np.float32)
    if with_bias:
        want = want + bias
    assert np.array_equal(kern(x), want)


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
def test_thread_pool_runs_every_chunk_exactly_once():
    """Back-to-back jobs of 1-16 chunks with more threads than cores (workers preempted between
    reading the job word and claiming): every chunk runs once before its job returns. A worker
    that read a finished job's word once compared it with the next job's chunk count and ran a
    chunk twice / after the caller had moved on (~40 of 300k jobs here; rare segfaults in decode)."""
    lib = build.load_library()
    for th in (3, 4):
        for maxc in (3, 5, 16):
            assert lib.tt_pool_selftest(300_000, maxc, th) == 0, (th, maxc)
    assert lib.tt_pool_selftest(1, 65, 2) == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_epilogue_multiplies_by_the_reciprocal_on_every_route(backend):
    """No route divides: out = float32(float64(dot) * w_scale * RN(1 / x_scale)). Row r has three
    weights of 1 and scale 11184809 * 2^-3r, the token 49 on those inputs (dot 147) and scale 49:
    the double quotient is exactly 33554427 * 2^-3r, a float midpoint that a division would round
    up (ties to even), while the product with RN(1/49) lands just below it and rounds down; every
    route gives the product's float. Plus scales giving subnormal, huge and ordinary results."""
    n, k = 40, 256
    w = np.zeros((n, k), dtype=np.int8)
    for r in range(n):
        w[r, 3 * r:3 * r + 3] = 1
    ws = np.ldexp(np.float32(11184809), -3 * np.arange(n)).astype(np.float32)
    ws[-4:] = [1e-30, 3e30, 0.7, 1.0]
    xq = np.zeros((9, k), dtype=np.int8)
    xq[:, :3 * n] = 49
    xs = np.array([49.0, 49.0, 98.0, 24.5, 49.0, 1e-3, 3e-38, 1e38, 11.0], dtype=np.float32)
    kern = TernaryLinearKernel(w, ws, backend=backend)
    if backend == "amx":
        kern.set_amx_min_m(1 << 20, few_min_m=2)  # the weights-as-A tiles
    dots = ternary_matmul_int_ref(xq, w).astype(np.float64)
    want = (dots * ws.astype(np.float64) * (1.0 / xs.astype(np.float64))[:, None]).astype(np.float32)
    assert want[0, 0] == np.float32(33554426.0)  # the product's rounding, not the quotient's 33554428
    assert np.float32(np.float64(147 * 11184809) / np.float64(49)) == np.float32(33554428.0)
    got = kern.matmul_int8(xq, xs)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
