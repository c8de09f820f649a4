"""Packing layouts: exact round trips, the documented bit positions, input validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tritlm.kernels.pack import (
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

SHAPES = [(1, 1), (1, 4), (3, 127), (5, 129), (4, 128), (67, 300), (2, 5), (7, 8), (9, 257)]


def _tern(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


@pytest.mark.parametrize("n,k", SHAPES)
def test_round_trips(n, k):
    rng = np.random.default_rng(n * 1000 + k)
    w = _tern(rng, n, k)
    p = pack_2bit(w)
    assert p.shape == (n, -(-k // 4)) and p.dtype == np.uint8
    assert np.array_equal(unpack_2bit(p, k), w)
    p3 = pack_base3(w)
    assert p3.shape == (n, -(-k // 5)) and p3.max() < 243
    assert np.array_equal(unpack_base3(p3, k), w)
    for il in (1, 4):
        pk = pack_ternary_kernel(w, interleave=il)
        assert pk.k_padded % 128 == 0 and pk.k_padded >= k and pk.n == n and pk.k == k
        assert pk.layout == ("i2s_r4" if il == 4 else "i2s")
        assert pk.data.nbytes == pk.n_padded * pk.k_padded // 4
        assert np.array_equal(unpack_ternary_kernel(pk), w)
        assert np.array_equal(pk.unpack(), w)
    b = np.where(rng.random((n, k)) < 0.5, -1, 1).astype(np.int8)
    pb = pack_binary(b)
    assert pb.shape == (n, -(-k // 8))
    assert np.array_equal(unpack_binary(pb, k), b)


def test_plain_2bit_bit_positions():
    w = np.array([[-1, 0, 1, 1, 0]], dtype=np.int8)  # codes 0 1 2 2 | 1 (+ pad code 1)
    p = pack_2bit(w)
    assert p[0, 0] == 0 | (1 << 2) | (2 << 4) | (2 << 6)
    assert p[0, 1] == 1 | (1 << 2) | (1 << 4) | (1 << 6)  # padding = zero weights


def test_kernel_layout_bit_positions():
    n, k = 6, 256
    rng = np.random.default_rng(1)
    w = _tern(rng, n, k)
    pk = pack_ternary_kernel(w)
    kb = pk.k_padded // 128
    assert pk.data.shape == (2, kb, 4, 32)
    flat = pk.data.reshape(-1)
    for row in range(n):
        g, r = divmod(row, 4)
        for col in (0, 1, 31, 32, 63, 64, 100, 127, 128, 200, 255):
            b, o = divmod(col, 128)
            s, j = divmod(o, 32)
            byte = flat[((g * kb + b) * 4 + r) * 32 + j]
            assert ((byte >> (2 * s)) & 3) == w[row, col] + 1
    # padded rows 6, 7 are all zero weights (code 1 everywhere = 0x55)
    assert np.all(pk.data[1, :, 2:, :] == 0x55)


def test_kernel_layout_k_padding_is_zero_weight():
    w = np.ones((4, 130), dtype=np.int8)
    pk = pack_ternary_kernel(w)
    assert pk.k_padded == 256
    codes = unpack_ternary_kernel(PackedTernary(pk.data, 4, 256, 256))
    assert np.all(codes[:, :130] == 1) and np.all(codes[:, 130:] == 0)


def test_base3_and_binary_values():
    w = np.array([[1, -1, 0, 1, 1, 0]], dtype=np.int8)
    p = pack_base3(w)
    assert p[0, 0] == 2 + 0 * 3 + 1 * 9 + 2 * 27 + 2 * 81
    assert p[0, 1] == 1 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81  # 0 then padding zeros
    b = np.array([[1, -1, -1, 1, -1, -1, -1, -1, 1]], dtype=np.int8)
    pb = pack_binary(b)
    assert pb[0, 0] == 0b00001001 and pb[0, 1] == 1


def test_accepts_other_int_dtypes_and_torch():
    torch = pytest.importorskip("torch")
    w = np.array([[1, 0, -1, 1]], dtype=np.int64)
    assert np.array_equal(unpack_2bit(pack_2bit(w), 4), w)
    assert np.array_equal(unpack_2bit(pack_2bit(torch.tensor(w)), 4), w)
    assert np.array_equal(unpack_2bit(pack_2bit(w.astype(np.float32)), 4), w)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([1, 0, -1], dtype=np.int8),  # 1-D
        np.zeros((2, 2, 2), dtype=np.int8),  # 3-D
        np.array([[2, 0]], dtype=np.int8),  # out of range
        np.array([[-2, 0]], dtype=np.int32),
        np.array([[0.5, 0.0]], dtype=np.float32),  # non-integer
        np.array([[300, 0]], dtype=np.int32),
        np.zeros((0, 4), dtype=np.int8),  # empty
        np.array([[True, False]]),
    ],
)
def test_validation_ternary(bad):
    for fn in (pack_2bit, pack_base3, pack_ternary_kernel):
        with pytest.raises(ValueError):
            fn(bad)


def test_validation_binary_and_unpack():
    with pytest.raises(ValueError, match="binary"):
        pack_binary(np.array([[1, 0, -1]], dtype=np.int8))
    with pytest.raises(ValueError):
        pack_binary(np.array([1, -1], dtype=np.int8))
    with pytest.raises(ValueError, match="code 3"):
        unpack_2bit(np.array([[0xFF]], dtype=np.uint8), 4)
    with pytest.raises(ValueError, match="243"):
        unpack_base3(np.array([[243]], dtype=np.uint8), 5)
    with pytest.raises(ValueError, match="columns"):
        unpack_2bit(np.zeros((1, 2), dtype=np.uint8), 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_binary(np.zeros((1, 1), dtype=np.int8), 8)
    with pytest.raises(ValueError, match="k must"):
        unpack_base3(np.zeros((1, 1), dtype=np.uint8), 0)
    with pytest.raises(ValueError, match="interleave"):
        pack_ternary_kernel(np.zeros((1, 1), dtype=np.int8), interleave=2)
    pk = pack_ternary_kernel(np.zeros((5, 10), dtype=np.int8))
    with pytest.raises(ValueError, match="shape"):
        unpack_ternary_kernel(PackedTernary(pk.data[:1], pk.n, pk.k, pk.k_padded))
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary_kernel(PackedTernary(np.full_like(pk.data, 0xFF), pk.n, pk.k, pk.k_padded))
    with pytest.raises(ValueError):
        unpack_ternary_kernel(np.zeros((4, 32), dtype=np.uint8))


tern_mats = st.tuples(st.integers(1, 9), st.integers(1, 300)).flatmap(
    lambda s: arrays(np.int8, s, elements=st.integers(-1, 1))
)


@settings(max_examples=60, deadline=None)
@given(tern_mats)
def test_property_ternary_round_trips(w):
    k = w.shape[1]
    assert np.array_equal(unpack_2bit(pack_2bit(w), k), w)
    assert np.array_equal(unpack_base3(pack_base3(w), k), w)
    assert np.array_equal(unpack_ternary_kernel(pack_ternary_kernel(w)), w)
    assert np.array_equal(unpack_ternary_kernel(pack_ternary_kernel(w, interleave=1)), w)


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 9), st.integers(1, 100)).flatmap(
    lambda s: arrays(np.int8, s, elements=st.sampled_from([-1, 1]))))
def test_property_binary_round_trip(w):
    assert np.array_equal(unpack_binary(pack_binary(w), w.shape[1]), w)
