"""The AVX-512 VNNI routes of every weight kind (ternary, int8, int4, binary): dispatch and results.

Where the CPU has AVX-512 VNNI, the shared kernel tests (kernel_backends.BACKENDS) run the routes
natively through every entry point. Here the routes (each kind's dots, chunking and epilogue) and
the CPUID/XCR0 check run on emulated CPUs (Bochs: a Sapphire Rapids Xeon, a Cannon Lake without
VNNI, an Arrow Lake without AVX-512), so they are tested on machines without the instructions too.
The references: numpy integer dots of codes decoded from the documented layout, the native
portable kernels, and /proc/cpuinfo.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import x86_emulator as emu
from kernel_backends import HAS_AVX512, HAS_C, LIB

from tritlm.kernels.cpu import build
from tritlm.kernels.pack import pack_ternary_kernel

pytestmark = pytest.mark.skipif(not HAS_C, reason="no compiled kernels")


@pytest.fixture(scope="module")
def emu_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("x86emu")
    why = emu.unavailable(d)
    if why:
        pytest.skip(why)
    return d


def _cpuinfo_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    pytest.skip("no /proc/cpuinfo")


def test_native_dispatch_matches_the_kernel_s_cpu_flags():
    f = _cpuinfo_flags()
    want = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= f
    assert bool(LIB.tt_has_avx512vnni()) == want


def test_an_unavailable_avx512_request_falls_back_with_a_warning(caplog):
    from tritlm.kernels.cpu import TernaryLinearKernel, resolve_backend

    if HAS_AVX512:
        pytest.skip("this CPU has AVX-512 VNNI")
    with caplog.at_level("WARNING", logger="tritlm.kernels"):
        assert resolve_backend("avx512") == resolve_backend("auto")
    assert "AVX-512 VNNI kernels requested" in caplog.text
    k = TernaryLinearKernel(torch.randint(-1, 2, (8, 128), dtype=torch.int8), backend="avx512")
    assert k.backend == resolve_backend("auto") and LIB.tt_ctx_get_isa(k._ctx) != 2


def test_every_kind_runs_its_vnni_route():
    from tritlm.kernels.cpu.lowbit import BinaryLinearKernel, Int4LinearKernel, Int8LinearKernel

    if not HAS_AVX512:
        pytest.skip("needs AVX-512 VNNI")
    for k in (Int8LinearKernel(torch.randint(-127, 128, (8, 64), dtype=torch.int8), 1.0, backend="avx512"),
              Int4LinearKernel(torch.randint(-7, 8, (8, 64), dtype=torch.int8), torch.ones(8, 2), 32, backend="avx512"),
              BinaryLinearKernel(torch.randint(0, 2, (8, 128), dtype=torch.int8) * 2 - 1, 1.0, backend="avx512")):
        assert k.backend == "avx512" and LIB.tt_ctx_get_isa(k._ctx) == 2


@pytest.mark.parametrize("model,xcr0,want", [
    ("sapphire_rapids", 0xE7, 1),
    ("sapphire_rapids", 0x07, 0),  # the OS leaves the opmask / ZMM state off: no AVX-512
    ("cannon_lake", 0xE7, 0),  # AVX-512 without VNNI
    ("arrow_lake", 0x07, 0),  # no AVX-512 at all
])
def test_emulated_dispatch(emu_dir, model, xcr0, want):
    res = emu.run_in_guest(emu_dir, model, build.library_path(), {"kind": "has_vnni"}, xcr0=xcr0)
    assert res["has_vnni"] == want, res


def _decode_i2s_r4(data: np.ndarray, n: int, kb: int) -> np.ndarray:
    """Codes q [n_pad, kb*128] from the documented layout: row 4g+r, block b at byte
    ((g*kb + b)*4 + r)*32; byte j holds q[j], q[j+32], q[j+64], q[j+96] in bits 1:0 .. 7:6."""
    ng = (n + 3) // 4
    b = data.reshape(ng, kb, 4, 32)
    q = np.stack([(b >> (2 * s)) & 3 for s in range(4)], axis=3)  # [g, kb, r, quarter, 32]
    return q.transpose(0, 2, 1, 3, 4).reshape(ng * 4, kb * 128).astype(np.int64)


def _run_cases(emu_dir, job: str, cases: dict, n: int, weights: str | None = None):
    """Run ``job`` over ``n`` cases (of ``weights`` kind, for "serial") on the emulated Xeon;
    returns its outputs (an npz)."""
    name = f"{job}-{weights}"
    kinds = {f"kind{i}": np.array(weights) for i in range(n)} if weights else {}
    np.savez(emu_dir / f"{name}.npz", n=np.array(n), **cases, **kinds)
    res = emu.run_in_guest(emu_dir, "sapphire_rapids", build.library_path(),
                           {"kind": job, "cases": str(emu_dir / f"{name}.npz"),
                            "out": str(emu_dir / f"{name}-out.npz")})
    assert res["cases"] == n
    return np.load(emu_dir / f"{name}-out.npz")


# (N, K, T): N not a multiple of 4 or 8 groups, K not a multiple of the 128-weight block, every
# token-quad remainder, one-block and many-block rows
SHAPES = [(1, 1, 1), (5, 130, 1), (7, 255, 3), (12, 128, 2), (33, 384, 5), (64, 1000, 4), (260, 640, 9),
          (9, 2200, 1), (18, 2200, 7)]


def test_emulated_vnni_dots_bit_exact(emu_dir):
    rng = np.random.default_rng(0)
    cases, refs = {}, []
    for i, (n, k, t) in enumerate(SHAPES):
        w = torch.from_numpy(rng.integers(-1, 2, (n, k), dtype=np.int8))
        pk = pack_ternary_kernel(w)
        kb = pk.k_padded // 128
        data = np.ascontiguousarray(pk.data).reshape(-1)
        q = _decode_i2s_r4(data, n, kb)
        assert np.array_equal(q[:n, :k] - 1, w.numpy()), "packing does not match the documented layout"
        assert (q[:n, k:] == 1).all() and (q[n:] == 1).all(), "padding must be zero weights (code 1)"
        x = np.zeros((t, kb * 128), dtype=np.int8)
        x[:, :k] = rng.integers(-128, 128, (t, k), dtype=np.int8)
        if i == 1:
            x[:, :k] = -128  # the extreme activation with every code
        cases.update({f"w{i}": data, f"x{i}": x, f"shape{i}": np.array([kb, q.shape[0] // 4, t])})
        refs.append(x.astype(np.int64) @ q.T)
    got = _run_cases(emu_dir, "dots", cases, len(SHAPES))
    for i, ref in enumerate(refs):
        assert np.array_equal(got[f"r{i}"].astype(np.int64), ref), f"shape {SHAPES[i]}"


def test_emulated_vnni_faults_without_the_instructions(emu_dir):
    """The harness can tell: the same call on a CPU without AVX-512 takes an invalid-opcode fault
    (so the bit-exact test above really ran the VNNI instructions)."""
    w = pack_ternary_kernel(torch.ones(4, 128, dtype=torch.int8))
    np.savez(emu_dir / "one.npz", n=np.array(1), w0=np.ascontiguousarray(w.data).reshape(-1),
             x0=np.ones((1, 128), dtype=np.int8), shape0=np.array([1, 1, 1]))
    with pytest.raises(RuntimeError, match="exception 6"):
        emu.run_in_guest(emu_dir, "arrow_lake", build.library_path(),
                         {"kind": "dots", "cases": str(emu_dir / "one.npz"), "out": str(emu_dir / "one-out.npz")},
                         xcr0=0x07)


def test_emulated_vnni_route_equals_the_portable_kernel(emu_dir):
    """The route's chunking and shared epilogue (scales, bias, raw dots) on the emulated Xeon give
    the native portable kernel's float32 outputs bit for bit."""
    from tritlm.kernels.cpu import TernaryLinearKernel

    rng = np.random.default_rng(1)
    cases, refs = {}, []
    shapes = [(5, 130, 1, 1), (37, 300, 6, 2), (64, 1000, 3, 8), (10, 256, 17, 3)]  # (N, K, M, groups per chunk)
    for i, (n, k, m, cg) in enumerate(shapes):
        w = torch.from_numpy(rng.integers(-1, 2, (n, k), dtype=np.int8))
        ws = rng.uniform(0.01, 2.0, n).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32) if i % 2 else np.zeros(0, np.float32)
        ref = TernaryLinearKernel(w, torch.from_numpy(ws), torch.from_numpy(bias) if bias.size else None,
                                  backend="portable", threads=1)
        kb = ref.k_padded // 128
        xq = np.zeros((m, kb * 128), dtype=np.int8)
        xq[:, :k] = rng.integers(-128, 128, (m, k), dtype=np.int8)
        xs = rng.uniform(0.5, 100.0, m).astype(np.float32)
        raw = int(i == 3)
        refs.append(ref.int_dots(xq[:, :k]) if raw else ref.matmul_int8(xq[:, :k], xs))
        cases.update({f"w{i}": np.ascontiguousarray(ref.packed.data).reshape(-1), f"wscale{i}": ref.w_scale,
                      f"bias{i}": bias, f"xq{i}": xq, f"xs{i}": xs,
                      f"sx{i}": xq.astype(np.int32).sum(1).astype(np.int32),
                      f"shape{i}": np.array([n, kb, m, cg, raw])})
    got = _run_cases(emu_dir, "serial", cases, len(shapes), "ternary")
    for i, ref in enumerate(refs):
        assert got[f"r{i}"].dtype == ref.dtype and np.array_equal(got[f"r{i}"], ref), f"shape {shapes[i]}"


def test_emulated_int8_vnni_route_equals_the_portable_kernel(emu_dir):
    """The int8 route (activations offset by 128, the row sums taken back out modulo 2^32) on the
    emulated Xeon: the native portable kernel's outputs and exact dots bit for bit, with K at the
    int8 limit and every activation / level at its extreme."""
    from tritlm.kernels.cpu.lowbit import Int8LinearKernel

    rng = np.random.default_rng(2)
    # (N, K, M, groups per chunk, raw dots): K with a 32-byte tail, N not a multiple of 4, token quads
    shapes = [(5, 96, 1, 1, 0), (37, 300, 6, 2, 0), (64, 1000, 3, 8, 1), (10, 256, 17, 3, 0), (3, 1 << 17, 2, 1, 1)]
    cases, refs = {}, []
    for i, (n, k, m, cg, raw) in enumerate(shapes):
        w = rng.integers(-127, 128, (n, k), dtype=np.int8)
        xq = rng.integers(-128, 128, (m, k), dtype=np.int8)
        if i == 4:  # the largest |dot|: level 127 against -128, and the largest offset sum (x = 127)
            w[:] = 127
            xq[0], xq[1] = -128, 127
        ws = rng.uniform(0.01, 2.0, n).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32) if i % 2 else np.zeros(0, np.float32)
        ref = Int8LinearKernel(torch.from_numpy(w), torch.from_numpy(ws), torch.from_numpy(bias) if bias.size else None,
                               backend="portable", threads=1)
        kp = ref.k_padded
        xs = rng.uniform(0.5, 100.0, m).astype(np.float32)
        refs.append(ref.int_dots(xq) if raw else ref.matmul_int8(xq, xs))
        if raw:
            assert np.array_equal(refs[-1], (xq.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32))
        xp = np.zeros((m, kp), dtype=np.int8)
        xp[:, :k] = xq
        cases.update({f"w{i}": np.ascontiguousarray(ref.packed.data).reshape(-1), f"wscale{i}": ref.w_scale,
                      f"bias{i}": bias, f"xq{i}": xp, f"xs{i}": xs, f"shape{i}": np.array([n, k, kp, m, cg, raw])})
    got = _run_cases(emu_dir, "serial", cases, len(shapes), "int8")
    for i, ref in enumerate(refs):
        assert got[f"r{i}"].dtype == ref.dtype and np.array_equal(got[f"r{i}"], ref), f"shape {shapes[i][:4]}"


@pytest.mark.parametrize("unit", [True, False], ids=["integer-sums", "random-scales"])
def test_emulated_int4_vnni_route_matches_the_portable_kernel(emu_dir, unit):
    """The int4 route on the emulated Xeon against the native portable kernel, every group size:
    exactly equal where every partial sum is an integer below 2^24 (unit scales), else within the
    rounding of a float32 sum taken in another order (as the AVX2 route)."""
    from tritlm.kernels.cpu.lowbit import Int4LinearKernel

    rng = np.random.default_rng(3)
    # (N, K, group, M, groups per chunk): K short of the 64-weight block, N not a multiple of 4
    shapes = [(5, 100, 32, 1, 1), (37, 300, 64, 3, 2), (18, 640, 128, 2, 8), (9, 256, 32, 5, 1), (64, 1000, 64, 1, 3)]
    cases, refs = {}, []
    for i, (n, k, g, m, cg) in enumerate(shapes):
        q = rng.integers(-7, 8, (n, k), dtype=np.int8)
        ng = -(-k // g)
        gs = np.ones((n, ng), np.float32) if unit else rng.uniform(0.01, 2.0, (n, ng)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32) if (i % 2 and not unit) else np.zeros(0, np.float32)
        ref = Int4LinearKernel(torch.from_numpy(q), torch.from_numpy(gs), g,
                               torch.from_numpy(bias) if bias.size else None, backend="portable", threads=1)
        kp = ref.k_padded
        xq = rng.integers(-128, 128, (m, k), dtype=np.int8)
        xs = np.ones(m, np.float32) if unit else rng.uniform(0.5, 100.0, m).astype(np.float32)
        refs.append(ref.matmul_int8(xq, xs))
        gpad = np.zeros((n, -(-kp // g)), np.float32)
        gpad[:, :ng] = gs
        xp = np.zeros((m, kp), dtype=np.int8)
        xp[:, :k] = xq
        cases.update({f"w{i}": np.ascontiguousarray(ref.packed.data).reshape(-1), f"gscale{i}": gpad, f"bias{i}": bias,
                      f"xq{i}": xp, f"xs{i}": xs, f"shape{i}": np.array([n, k, kp, g, m, cg])})
    got = _run_cases(emu_dir, "serial", cases, len(shapes), "int4")
    for i, ref in enumerate(refs):
        y = got[f"r{i}"]
        if unit:
            assert np.array_equal(y, ref), f"shape {shapes[i]}"
        else:
            assert np.abs(y.astype(np.float64) - ref).max() <= 1e-5 * np.abs(ref).max(), f"shape {shapes[i]}"


def test_emulated_binary_vnni_route_equals_the_portable_kernel(emu_dir):
    """The binary route (bits spread to 0/1 bytes by per-lane shifts, 2 * sum(x where set) - sum x)
    on the emulated Xeon: the native portable kernel's outputs and exact dots bit for bit."""
    from tritlm.kernels.cpu.lowbit import BinaryLinearKernel

    rng = np.random.default_rng(4)
    shapes = [(5, 100, 1, 1, 0), (37, 300, 6, 2, 1), (64, 1000, 3, 8, 0), (10, 256, 17, 3, 1)]  # (N, K, M, cg, raw)
    cases, refs = {}, []
    for i, (n, k, m, cg, raw) in enumerate(shapes):
        w = rng.integers(0, 2, (n, k), dtype=np.int8) * 2 - 1
        ws = rng.uniform(0.01, 2.0, n).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32) if i % 2 else np.zeros(0, np.float32)
        ref = BinaryLinearKernel(torch.from_numpy(w), torch.from_numpy(ws),
                                 torch.from_numpy(bias) if bias.size else None, backend="portable", threads=1)
        kp = ref.k_padded
        xq = rng.integers(-128, 128, (m, k), dtype=np.int8)
        xs = rng.uniform(0.5, 100.0, m).astype(np.float32)
        refs.append(ref.int_dots(xq) if raw else ref.matmul_int8(xq, xs))
        if raw:
            assert np.array_equal(refs[-1], xq.astype(np.int64) @ w.T.astype(np.int64))
        xp = np.zeros((m, kp), dtype=np.int8)
        xp[:, :k] = xq
        cases.update({f"w{i}": np.ascontiguousarray(ref.packed.data).reshape(-1), f"wscale{i}": ref.w_scale,
                      f"bias{i}": bias, f"xq{i}": xp, f"xs{i}": xs,
                      f"sx{i}": xq.astype(np.int32).sum(1).astype(np.int32),
                      f"shape{i}": np.array([n, k, kp, m, cg, raw])})
    got = _run_cases(emu_dir, "serial", cases, len(shapes), "binary")
    for i, ref in enumerate(refs):
        assert got[f"r{i}"].dtype == ref.dtype and np.array_equal(got[f"r{i}"], ref), f"shape {shapes[i][:4]}"
