"""The Triton packed-ternary GEMV / GEMM (kernels/triton/ternary_mm.py) against float64 math.

On a machine without CUDA these run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); with CUDA, on the GPU as well.
"""

import pytest

pytest.importorskip("triton")

import torch

from tritlm.kernels.triton.layout import pack_t2, unpack_t2
from tritlm.kernels.triton.ternary_mm import SMALL_M, ternary_linear, ternary_linear_reference
from tritlm.nn.packed_linear import PackedLinear, pack_levels
from tritlm.quant.config import TERNARY
from tritlm.quant.weights import quantize_weight

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(1, 1, 5), (1, 7, 13), (2, 33, 100), (5, 16, 64), (16, 65, 129), (17, 40, 70), (33, 9, 200),
          (1, 300, 260), (3, 140, 300), (40, 290, 270)]  # the last three: several blocks in N and K


def _float64(x: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The integer math in float64: round(x * s) (s in float32, as the kernels) times the levels."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = (xf * s).round().clamp(-128, 127).double()
    acc = q @ levels.double().t()  # exact: integers below 2^53
    return acc / s.double() * scale.double().view(1, -1)


def test_layout_round_trip_on_awkward_widths():
    for k in (1, 3, 4, 5, 13, 64, 129):
        lv = torch.randint(-1, 2, (6, k), dtype=torch.int8)
        p = pack_t2(lv)
        assert p.shape == (6, (k + 3) // 4) and torch.equal(unpack_t2(p, k), lv)
    with pytest.raises(ValueError, match="levels"):
        pack_t2(torch.full((2, 3), 2, dtype=torch.int8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("per_row", [True, False])
def test_ternary_linear_matches_float64(device, m, n, k, per_row):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = (torch.randn(m, k, generator=g) * 3).to(device)
    lv = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    sc = torch.rand(n if per_row else 1, generator=g) + 0.25
    y = ternary_linear(x, pack_t2(lv).to(device), sc.to(device), k).cpu()
    want = _float64(x.cpu(), lv, sc)
    # only the float epilogue rounds: a few float32 ulps of the largest output
    assert torch.allclose(y.double(), want, rtol=2e-6, atol=2e-6 * float(want.abs().max()) + 1e-30)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 3, SMALL_M + 1])
def test_activation_rounding_is_bit_exact_with_torch_round(device, m):
    """Identity levels expose the quantised activations: y * s recovers round(x * s) exactly. With
    max|x| = 127 / 16, s = 16 exactly and x = (j + 0.5) / 16 puts x * s on ties, which must go to
    even as torch.round does."""
    k = 40
    x = torch.tensor([[(j - 20 + 0.5) / 16 for j in range(k)]] * m)
    x[:, 0] = 127 / 16
    x[:, 1:] += torch.arange(m).view(-1, 1) / 16  # other ties per row
    y = ternary_linear(x.to(device), pack_t2(torch.eye(k, dtype=torch.int8)).to(device),
                       torch.ones(1, device=device), k).cpu()
    assert torch.equal(y * 16, (x * 16).round().clamp(-128, 127))
    assert float((x[:, 1:] * 16).frac().abs().min()) == 0.5  # the test does exercise ties


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_input_and_zero_rows(device):
    x = torch.randn(3, 48).to(torch.bfloat16)
    x[1] = 0  # absmax 0: the eps keeps s finite, the row's output is 0
    lv = torch.randint(-1, 2, (10, 48), dtype=torch.int8)
    sc = torch.rand(10) + 0.5
    y = ternary_linear(x.to(device), pack_t2(lv).to(device), sc.to(device), 48).cpu()
    assert torch.equal(y[1], torch.zeros(10))
    assert torch.allclose(y.double(), _float64(x, lv, sc), rtol=2e-6, atol=1e-5)


def test_reference_is_packed_linears_reference():
    """ternary_linear_reference restates PackedLinear.reference (the CPU runtime's math) on t2_k4."""
    w = torch.randn(12, 30)
    q, s = quantize_weight(w, TERNARY)
    pl: PackedLinear = pack_levels(q, s, TERNARY)
    x = torch.randn(4, 30)
    got = ternary_linear_reference(x, pack_t2(torch.from_numpy(pl.levels())), torch.from_numpy(pl.row_scales()), 30)
    assert torch.allclose(got, pl.reference(x), rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_one_line_errors():
    p = pack_t2(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="x must be"):
        ternary_linear(torch.randn(2, 9), p, torch.ones(1), 8)
    with pytest.raises(ValueError, match="scale"):
        ternary_linear(torch.randn(2, 8), p, torch.ones(3), 8)


_AOT = r'''
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritlm.kernels.triton import ternary_mm as tm

def ptx(fn, sig, const, cc, **opts):
    sig = {**sig, **{k: "constexpr" for k in const}}
    return triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", cc, 32),
                          options=opts).asm["ptx"]

gemv = dict(x_ptr="*bf16", w_ptr="*u8", sc_ptr="*fp32", o_ptr="*fp32", M="i32", N="i32", K="i32", KB="i32",
            sxm="i32", som="i32")
for dot, bm in ((False, 1), (True, 16)):
    for cc in (80, 90):
        b = tm._blocks("cuda", True, bm)
        p = ptx(tm._gemv, gemv, dict(PER_ROW=True, DOT=dot, BM=bm, BN=b["BN"], BK=b["BK"]), cc,
                num_warps=b["num_warps"], enable_fp_fusion=False)
        assert "div.rn.f32" in p and "fma.rn.f32" not in p, (dot, cc)
        if dot:
            assert re.search(r"mma\S*\.s32\.s8\.s8", p), ("no int8 MMA in the small-M GEMV", cc)
gemm = dict(q_ptr="*i8", s_ptr="*fp32", w_ptr="*u8", sc_ptr="*fp32", o_ptr="*fp32", M="i32", N="i32", K="i32",
            KB="i32", sqm="i32", som="i32")
for m, cc in ((2048, 90), (128, 90), (64, 80)):
    b = tm._blocks("cuda", False, m)
    p = ptx(tm._gemm, gemm, dict(PER_ROW=False, BM=b["BM"], BN=b["BN"], BK=b["BK"]), cc,
            num_warps=b["num_warps"], num_stages=b["num_stages"])
    assert re.search(r"(wgmma|mma)\S*\.s32\.s8\.s8", p), ("no int8 MMA in the GEMM", m, cc)
print("ok")
'''


def test_kernels_lower_to_cuda_int8_mma():
    """Both kernels compile to PTX for sm_80 and sm_90 in a fresh process (no interpreter there),
    with int8 tensor-core MMA where they use tl.dot, IEEE divisions and no FMA contraction in the
    GEMV's rounding: the CUDA build is checked on a machine without a GPU."""
    import os
    import pathlib
    import subprocess
    import sys

    import triton.backends

    if not list(pathlib.Path(triton.backends.__path__[0]).glob("nvidia/bin/ptxas*")):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
