"""int8 / int4 / binary kernels (AVX2, portable C, numpy) against float64 references computed here."""

import copy
import pickle
import zlib

import numpy as np
import pytest
from kernel_backends import HAS_C, LIB, LOWBIT_BACKENDS

from tritlm.kernels.cpu import (
    BinaryLinearKernel,
    Int4LinearKernel,
    Int8LinearKernel,
    TernaryLinearKernel,
    ops,
)
from tritlm.kernels.pack import pack_ternary_kernel
from tritlm.kernels.pack_rows import (
    PackedBinary,
    PackedInt4,
    PackedInt8,
    concat_rows,
    pack_binary_kernel,
    pack_int4,
    pack_int8,
    unpack_binary_kernel,
    unpack_int4,
    unpack_int8,
)
from tritlm.kernels.reference import quantize_act_ref

NS = [1, 3, 37, 64]
KS = [5, 33, 100, 257, 1000]
MS = [1, 2, 17]
THREADS = [1, 3]
KINDS = ["int8", "int4g32", "int4g64", "int4g128", "binary"]


@pytest.fixture(autouse=True, scope="module")
def _split_tiny_work():
    """Let every thread get work even on tiny matrices, so thread splits are exercised."""
    ops.set_min_chunk_blocks(1)
    yield
    ops.set_min_chunk_blocks(256)


# --------------------------------------------------------------------------- references (float64)
def _random_kind(kind, n, k, rng):
    """(levels int8 [n, k], dequantised float64 [n, k], kernel factory(bias, **kw))."""
    if kind == "int8":
        q = rng.integers(-127, 128, size=(n, k)).astype(np.int8)
        s = rng.uniform(0.001, 0.02, size=n).astype(np.float32)
        deq = q.astype(np.float64) * s.astype(np.float64)[:, None]
        return q, deq, lambda bias=None, **kw: Int8LinearKernel(q, s, bias, **kw)
    if kind == "binary":
        q = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, k))
        s = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
        deq = q.astype(np.float64) * s.astype(np.float64)[:, None]
        return q, deq, lambda bias=None, **kw: BinaryLinearKernel(q, s, bias, **kw)
    g = int(kind[len("int4g"):])
    q = rng.integers(-7, 8, size=(n, k)).astype(np.int8)
    ng = -(-k // g)
    gs = rng.uniform(0.01, 0.3, size=(n, ng)).astype(np.float32)
    deq = np.zeros((n, k))
    for j in range(ng):  # group j covers weights [j*g, min((j+1)*g, k))
        sl = slice(j * g, min((j + 1) * g, k))
        deq[:, sl] = q[:, sl].astype(np.float64) * gs[:, j : j + 1].astype(np.float64)
    return q, deq, lambda bias=None, **kw: Int4LinearKernel(q, gs, g, bias, **kw)


def _ref(x, deq, bias=None):
    xq, xs = quantize_act_ref(x)
    y = (xq.astype(np.float64) @ deq.T) / xs.astype(np.float64)[:, None]
    return y if bias is None else y + bias.astype(np.float64)


def _close(y, ref, rtol=1e-5):
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(y - ref).max())
    assert err <= rtol * scale, f"max err {err / scale:.3g} of max |y|"


# --------------------------------------------------------------------------- float outputs
@pytest.mark.parametrize("backend", LOWBIT_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_lowbit_matches_float64_reference(kind, backend):
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{backend}".encode()))
    for k in KS:
        for n in NS:
            _, deq, make = _random_kind(kind, n, k, rng)
            bias = rng.standard_normal(n).astype(np.float32) if n != 3 else None
            kern = make(bias, backend=backend)
            assert kern.backend == backend and kern.n == n and kern.k == k
            for m in MS:
                x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 10)).astype(np.float32)
                ref = _ref(x, deq, bias)
                xq, xs = quantize_act_ref(x)
                for th in THREADS:
                    kern.threads = th
                    _close(kern(x), ref)
                    _close(kern.matmul_int8(xq, xs), ref)


@pytest.mark.parametrize("backend", LOWBIT_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_lowbit_realistic_shape_and_gemm_panels(kind, backend):
    rng = np.random.default_rng(1)
    n, k = 300, 2048 + 64 + 32  # several GEMM panels, a partial last panel, 16-block binary runs
    _, deq, make = _random_kind(kind, n, k, rng)
    bias = rng.standard_normal(n).astype(np.float32)
    kern = make(bias, backend=backend, threads=2)
    for m in (1, 5, 20):
        x = rng.standard_normal((m, k)).astype(np.float32)
        _close(kern(x), _ref(x, deq, bias))
    if kern._ctx is not None:
        for pr in (4, 8, 64):
            kern.set_params({1: {"panel_rows": pr}, 2: {"panel_rows": pr}})
            x = rng.standard_normal((19, k)).astype(np.float32)
            _close(kern(x), _ref(x, deq, bias))


# --------------------------------------------------------------------------- exact integer dots
@pytest.mark.parametrize("backend", LOWBIT_BACKENDS)
@pytest.mark.parametrize("kind", ["int8", "binary"])
def test_exact_integer_dots(kind, backend):
    rng = np.random.default_rng(3)
    for k in KS + [4096 + 5]:
        for n in (1, 37, 64):
            q, _, make = _random_kind(kind, n, k, rng)
            kern = make(backend=backend)
            for m in MS:
                xq = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
                want = xq.astype(np.int64) @ q.astype(np.int64).T
                for th in THREADS:
                    kern.threads = th
                    assert np.array_equal(kern.int_dots(xq), want), (k, n, m, th)


@pytest.mark.parametrize("backend", LOWBIT_BACKENDS)
@pytest.mark.parametrize("kind", ["int8", "binary", "int4g32", "int4g128"])
def test_extreme_values(kind, backend):
    """x = -128 everywhere (the sign trick's edge case) and all-max weights: exact, no overflow."""
    k = 4096 + 128 + 7
    n = 8
    if kind == "int8":
        q = np.full((n, k), 127, dtype=np.int8)
        q[4:] = -127
        kern = Int8LinearKernel(q, 1.0, backend=backend, threads=2)
    elif kind == "binary":
        q = np.ones((n, k), dtype=np.int8)
        q[4:] = -1
        kern = BinaryLinearKernel(q, 1.0, backend=backend, threads=2)
    else:
        g = int(kind[len("int4g"):])
        q = np.full((n, k), 7, dtype=np.int8)
        q[4:] = -7
        kern = Int4LinearKernel(q, np.ones((n, -(-k // g)), dtype=np.float32), g, backend=backend, threads=2)
    for v in (-128, 127):
        for m in (1, 3):
            xq = np.full((m, k), v, dtype=np.int8)
            want = xq.astype(np.int64) @ q.astype(np.int64).T
            if kern.exact_int:
                assert np.array_equal(kern.int_dots(xq), want)
            y = kern.matmul_int8(xq, np.ones(m, dtype=np.float32))
            np.testing.assert_allclose(y, want.astype(np.float64), rtol=1e-6)


# --------------------------------------------------------------------------- layouts
def test_pack_round_trips_and_sizes():
    rng = np.random.default_rng(4)
    for n in (1, 3, 37):
        for k in KS + [256, 4096]:
            w8 = rng.integers(-127, 128, size=(n, k))
            p8 = pack_int8(w8)
            assert isinstance(p8, PackedInt8) and p8.layout == "i8_k32" and p8.k_padded % 32 == 0
            assert np.array_equal(p8.unpack(), w8) and np.array_equal(unpack_int8(p8), w8)
            w4 = rng.integers(-7, 8, size=(n, k))
            for g in (32, 64, 128):
                p4 = pack_int4(w4, g)
                assert isinstance(p4, PackedInt4) and p4.layout == "i4_k64" and p4.group_size == g
                assert p4.n_groups == -(-k // g)
                assert np.array_equal(p4.unpack(), w4) and np.array_equal(unpack_int4(p4), w4)
            wb = rng.choice([-1, 1], size=(n, k))
            pb = pack_binary_kernel(wb)
            assert isinstance(pb, PackedBinary) and pb.layout == "b1_k128"
            assert np.array_equal(pb.unpack(), wb) and np.array_equal(unpack_binary_kernel(pb), wb)
            if k % 128 == 0 or k >= 4096:  # realistic shapes: within 2% of 8 / 4 / 1 bits per weight
                for p, bits in ((p8, 8), (p4, 4), (pb, 1)):
                    assert p.nbytes <= 1.02 * n * k * bits / 8, (p.layout, n, k, p.nbytes)


def test_pack_layout_details():
    # int4: byte j of block b = (q[64b+j] + 8) | (q[64b+32+j] + 8) << 4; padding nibbles 8
    w = np.arange(70).reshape(1, 70) % 15 - 7
    p = pack_int4(w, 32)
    assert p.data.shape == (1, 64) and p.data.dtype == np.uint8
    assert p.data[0, 0] == (w[0, 0] + 8) | ((w[0, 32] + 8) << 4)
    assert p.data[0, 32 + 5] == (w[0, 69] + 8) | (8 << 4)
    assert p.data[0, 32 + 6] == 8 | (8 << 4)
    # binary: bit s of byte j of block b = w[128b + 16s + j] > 0
    w = -np.ones((1, 130), dtype=np.int8)
    w[0, 16 * 3 + 5] = 1
    w[0, 129] = 1
    p = pack_binary_kernel(w)
    assert p.data.shape == (1, 32)
    assert p.data[0, 5] == 1 << 3 and p.data[0, 16 + 1] == 1 and p.data.sum() == 9
    # int8: zero padded to 32
    p = pack_int8(np.ones((2, 40), dtype=np.int8))
    assert p.data.shape == (2, 64) and p.data[:, 40:].sum() == 0


def test_pack_rejects_bad_values():
    with pytest.raises(ValueError):
        pack_int8(np.full((2, 3), -128))
    with pytest.raises(ValueError):
        pack_int4(np.full((2, 3), 8))
    with pytest.raises(ValueError):
        pack_int4(np.zeros((2, 3)), group_size=16)
    with pytest.raises(ValueError):
        pack_binary_kernel(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        Int4LinearKernel(np.zeros((2, 100)), np.ones((2, 3)), 64)  # needs [2, 2] scales
    with pytest.raises(ValueError):
        Int8LinearKernel(np.zeros((2, 10)), np.ones(3))
    with pytest.raises(ValueError):
        BinaryLinearKernel(np.ones((2, 10)), 1.0, bias=np.ones(5))


def test_concat_rows():
    rng = np.random.default_rng(5)
    k = 300
    parts = [(5, 37, 4)]  # row counts of q, k, v
    sizes = parts[0]
    w8 = [rng.integers(-127, 128, size=(n, k)) for n in sizes]
    w4 = [rng.integers(-7, 8, size=(n, k)) for n in sizes]
    wb = [rng.choice([-1, 1], size=(n, k)) for n in sizes]
    wt = [rng.integers(-1, 2, size=(n, k)) for n in sizes]
    for ws, pack in ((w8, pack_int8), (w4, lambda w: pack_int4(w, 32)), (wb, pack_binary_kernel),
                     (wt, pack_ternary_kernel)):
        fused = concat_rows([pack(w) for w in ws])
        assert fused.n == sum(sizes) and fused.k == k
        assert np.array_equal(fused.unpack(), np.concatenate(ws, axis=0))
    wt4 = [rng.integers(-1, 2, size=(n, k)) for n in (4, 8)]  # no unpacking: plain concatenation
    fused = concat_rows([pack_ternary_kernel(w) for w in wt4])
    assert np.array_equal(fused.unpack(), np.concatenate(wt4, axis=0))
    assert concat_rows([pack_int4(w4[0], 128), pack_int4(w4[1], 128)]).group_size == 128
    with pytest.raises(ValueError):
        concat_rows([pack_int4(w4[0], 32), pack_int4(w4[1], 64)])
    with pytest.raises(ValueError):
        concat_rows([pack_int8(w8[0]), pack_binary_kernel(wb[0])])
    with pytest.raises(ValueError):
        concat_rows([pack_int8(w8[0]), pack_int8(rng.integers(-127, 128, size=(3, 100)))])


@pytest.mark.parametrize("backend", LOWBIT_BACKENDS)
def test_fused_qkv_kernel_equals_separate_kernels(backend):
    rng = np.random.default_rng(6)
    k, sizes = 257, (8, 5, 5)
    w = [rng.integers(-7, 8, size=(n, k)) for n in sizes]
    gs = [rng.uniform(0.1, 1, size=(n, -(-k // 64))).astype(np.float32) for n in sizes]
    fused = Int4LinearKernel(concat_rows([pack_int4(x, 64) for x in w]), np.concatenate(gs), backend=backend)
    x = rng.standard_normal((3, k)).astype(np.float32)
    sep = np.concatenate([Int4LinearKernel(a, s, 64, backend=backend)(x) for a, s in zip(w, gs)], axis=1)
    np.testing.assert_allclose(fused(x), sep, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- interface
@pytest.mark.parametrize("backend", LOWBIT_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_interface_pickle_packed_input_and_torch(kind, backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    n, k = 20, 150
    q, deq, make = _random_kind(kind, n, k, rng)
    bias = np.arange(n, dtype=np.float32)
    kern = make(bias, backend=backend, threads=2)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    y = kern(x)
    assert y.shape == (2, 3, n) and y.dtype == np.float32
    _close(y.reshape(6, n), _ref(x.reshape(6, k), deq, bias))
    yt = kern(torch.from_numpy(x))
    assert isinstance(yt, torch.Tensor) and np.array_equal(yt.numpy(), y)
    out = np.empty((2, 3, n), dtype=np.float32)
    assert kern(x, out=out) is out and np.array_equal(out, y)
    np.testing.assert_array_equal(kern(x[0, 0]), y[0, 0])
    assert kern(np.zeros((0, k), dtype=np.float32)).shape == (0, n)
    for other in (copy.deepcopy(kern), pickle.loads(pickle.dumps(kern))):
        assert type(other) is type(kern) and other.backend == kern.backend and other.threads == 2
        if kern._ctx is not None:
            assert other._ctx != kern._ctx and other._fwd is not None
        assert np.array_equal(other(x), y)
    # constructing from the packed matrix gives the same kernel
    again = type(kern)(kern.packed, *kern._ctor_args()[1:], bias=bias, backend=backend)
    assert np.array_equal(again(x), y)
    with pytest.raises(ValueError, match=str(k)):
        kern(np.zeros((2, k + 1), dtype=np.float32))
    if kind.startswith("int4"):
        with pytest.raises(ValueError, match="integer dot"):
            kern.int_dots(np.zeros((1, k), dtype=np.int8))


def test_int4_group_size_inferred_from_scales():
    rng = np.random.default_rng(8)
    q = rng.integers(-7, 8, size=(4, 300)).astype(np.int8)
    for g in (32, 64, 128):
        kern = Int4LinearKernel(q, np.ones((4, -(-300 // g)), dtype=np.float32))
        assert kern.group_size == g and kern.kind == f"int4g{g}"
    kern = Int4LinearKernel(pack_int4(q, 32), np.ones((4, 10), dtype=np.float32))
    assert kern.group_size == 32


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
def test_one_context_type_and_kind():
    rng = np.random.default_rng(9)
    w = rng.integers(-1, 2, size=(8, 64)).astype(np.int8)
    kinds = {TernaryLinearKernel(w): 0, Int8LinearKernel(w, 1.0): 1,
             Int4LinearKernel(w, np.ones((8, 1), dtype=np.float32), 64): 2,
             BinaryLinearKernel(np.where(w == 0, 1, w), 1.0): 3}
    for kern, kind in kinds.items():
        assert LIB.tt_ctx_get_kind(kern._ctx) == kind
        assert kern._fwd is LIB.tt_forward_f32


@pytest.mark.skipif(not HAS_C, reason="no compiled kernels")
def test_tune_lowbit_smoke(tmp_path, monkeypatch):
    from tritlm.kernels import autotune

    monkeypatch.setenv("TRITLM_CACHE_DIR", str(tmp_path))
    autotune.clear_memo()
    try:
        rng = np.random.default_rng(10)
        kern = Int8LinearKernel(rng.integers(-127, 128, size=(16, 256)), 1.0, threads=1)
        cands = {0: [{"chunks": 2}, {"chunks": 4}], 1: [{"panel_rows": 8}], 2: [{"panel_rows": 16}]}
        default = kern.params[1]["panel_rows"]  # competes too: kept unless 8 is clearly faster
        best = kern.tune(ms=(1, 3), threads=1, candidates=cands, repeats=1, flush_bytes=0)
        assert set(best) == {0, 1} and best[1]["panel_rows"] in (8, default)
        assert kern.params[1]["panel_rows"] == best[1]["panel_rows"]
        assert autotune.lookup(16, 256, 1, kern.backend, kind="int8") == best
        assert autotune.lookup(16, 256, 1, kern.backend) is None  # ternary entries are separate
        again = Int8LinearKernel(np.zeros((16, 256)), 1.0, threads=1)
        assert again.params[1]["panel_rows"] == best[1]["panel_rows"]
    finally:
        autotune.clear_memo()
