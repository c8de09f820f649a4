"""Triton training kernels (quantisers, int8 x ternary GEMM, the BitLinear autograd Function) against
the torch path they replace; on CUDA when there is one, else in the Triton interpreter."""

from __future__ import annotations

import copy
import os

import pytest
import torch

if not torch.cuda.is_available():
    # read when triton.language and the kernels are decorated: before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tritlm.kernels.triton import bitlinear as tb  # noqa: E402
from tritlm.kernels.triton import quantize as tq  # noqa: E402
from tritlm.kernels.triton.layout import pack_t2  # noqa: E402
from tritlm.kernels.triton.quantize import _rne  # noqa: E402
from tritlm.model.config import ModelConfig  # noqa: E402
from tritlm.model.transformer import Transformer  # noqa: E402
from tritlm.nn import BitLinear, RMSNorm, set_kernel  # noqa: E402
from tritlm.nn.bitlinear import _dequant_weight, share_act_slot  # noqa: E402
from tritlm.quant import TERNARY, QuantConfig, absmax_int8, quantize_weight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = DEV == "cpu"  # the same float ops on both sides; cuBLAS may pick other GEMM splits per call
SHAPES = [(1, 13, 1), (3, 64, 7), (17, 100, 33), (17, 13, 7), (1, 100, 33), (3, 13, 33)]  # (M, K, N)
DTYPES = [torch.float32, torch.bfloat16]


def _rand(shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEV)


@triton.jit
def _rne_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    tl.store(y_ptr + o, _rne(tl.load(x_ptr + o, mask=m, other=0.0)), mask=m)


def test_round_half_even_like_torch_round():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5, 0.49999997, 0.50000006, 3.0, -0.0],
                     device=DEV)
    x = torch.cat([x, _rand(500, 0, 100.0)])
    y = torch.empty_like(x)
    _rne_kernel[(1,)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y, torch.round(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "k"), [(1, 13), (3, 64), (17, 100), (2, 3000)])
def test_act_quant_is_absmax_int8(dtype, m, k):
    x = _rand((m, k), m * 100 + k, 3.0, dtype)
    x[0, : min(k, 5)] = 0.0
    q, s = tq.act_quant(x)
    rq, rs = absmax_int8(x, 8, 1e-5, as_int=True)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m, 1)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert tuple(map(torch.equal, tq.act_quant_reference(x), (rq, rs))) == (True, True)


def test_act_quant_zero_rows_and_strided_input():
    x = torch.zeros(3, 20, device=DEV)
    q, s = tq.act_quant(x, eps=1e-5)
    assert torch.equal(q, torch.zeros_like(q)) and torch.equal(s, absmax_int8(x, 8, 1e-5)[1])
    big = _rand((4, 40), 1)
    q, s = tq.act_quant(big[:, ::2])
    assert torch.equal(q, absmax_int8(big[:, ::2], 8, 1e-5, as_int=True)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(("m", "k"), [(3, 64), (17, 100)])
def test_act_quant_with_rmsnorm_matches_module(dtype, affine, m, k):
    x = _rand((m, k), k, 2.0, dtype)
    norm = RMSNorm(k, affine=affine).to(DEV)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(_rand(k, 3).abs() + 0.5)
    q, s = tq.act_quant(x, norm=norm.weight.detach() if affine else True)
    with torch.no_grad():
        rq, rs = absmax_int8(norm(x), 8, 1e-5, as_int=True)
    # the sum of squares is reduced in another order: 1/rms may move by an ulp, which can move a
    # bfloat16 normed value by one of its ulps and a level by one
    assert (q.int() - rq.int()).abs().max() <= 1
    assert (q != rq).float().mean() < 0.05
    torch.testing.assert_close(s, rs, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(1, 13), (7, 64), (33, 100), (5, 3)])
def test_ternarize_is_the_torch_path(dtype, n, k):
    w = _rand((n, k), n * 7 + k, 0.02, dtype)
    lv, gamma = tq.ternarize(w, 1e-5)
    rl, rg = tq.ternarize_reference(w, 1e-5)
    assert lv.dtype == torch.int8 and gamma.dtype == torch.float32 and gamma.dim() == 0
    assert torch.equal(lv, rl) and torch.equal(gamma, rg)
    cfg = QuantConfig()
    ql, qs = quantize_weight(w.float(), cfg)
    assert torch.equal(lv, ql.to(torch.int8)) and torch.equal(gamma, qs)
    assert torch.equal(lv.float() * gamma, _dequant_weight(w, cfg))
    p, pg = tq.ternarize_pack(w, 1e-5)
    assert torch.equal(p, pack_t2(rl)) and torch.equal(pg, rg)
    assert tuple(map(torch.equal, tq.ternarize_pack_reference(w, 1e-5), (p, pg))) == (True, True)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_is_the_integer_math(out_dtype, m, k, n, bias):
    q, s = tq.act_quant(_rand((m, k), m + k + n, 2.0))
    lv, gamma = tq.ternarize(_rand((n, k), n, 0.02))
    b = _rand(n, 5, 0.1) if bias else None
    y = tb.int8_ternary_mm(q, s, lv, gamma, b, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    acc = q.double() @ lv.double().t()
    assert torch.equal(acc, acc.round())  # the integer sum the kernel must reproduce exactly
    scale = gamma.double() / s.double()
    ref = tb.int8_ternary_mm_reference(q, s, lv, gamma, b, torch.float64)
    mag = acc.abs() * scale + (b.double().abs() if bias else 0.0)  # no cancellation in the bound
    ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[out_dtype]
    # a few float32 roundings in the epilogue, then one rounding to the output dtype
    assert ((y.double() - ref).abs() <= mag * (ulp + 4 * 2.0 ** -24) + 1e-30).all()


def test_dequant_is_the_torch_arithmetic():
    q, s = tq.act_quant(_rand((17, 100), 9, 3.0))
    lv, gamma = tq.ternarize(_rand((33, 100), 8, 0.02))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(tb.dequant(q, s, dt), (q.float() / s).to(dt))
        assert torch.equal(tb.dequant(lv, gamma, dt), (lv.float() * gamma).to(dt))


def _pair(k, n, bias, cfg=TERNARY, seed=0):
    ref = BitLinear(k, n, bias=bias, config=cfg).to(DEV)
    with torch.no_grad():
        ref.weight.copy_(_rand((n, k), seed, 0.02))
        if bias:
            ref.bias.copy_(torch.linspace(-0.1, 0.1, n))
    tri = copy.deepcopy(ref)
    tri.kernel = "triton"
    return ref, tri


def _run(mod, x, g, autocast):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
        y = mod(x)
    y.backward(g.to(y.dtype))
    return y.detach(), x.grad, mod.weight.grad, None if mod.bias is None else mod.bias.grad


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES[:4])
@pytest.mark.parametrize("bias", [False, True])
def test_function_matches_torch_path(mode, m, k, n, bias):
    ref, tri = _pair(k, n, bias, QuantConfig(ste_scale=2.0) if bias else QuantConfig())
    x = _rand((m, k), m * k, 2.0)
    if mode == "bf16":
        ref, tri, x = ref.bfloat16(), tri.bfloat16(), x.bfloat16()
    g = _rand((m, n), 77)
    ya, *ga = _run(ref, x, g, mode == "autocast")
    yb, *gb = _run(tri, x, g, mode == "autocast")
    assert ya.dtype == yb.dtype == (torch.float32 if mode == "fp32" else torch.bfloat16)
    # bound each output by the sum of |terms|: the torch path rounds deq(x) and deq(W) to bfloat16
    # and sums in a float GEMM, the Triton path sums exact integers, so they differ by that rounding
    q, s = absmax_int8(x, 8, 1e-5)
    lv, gamma = tq.ternarize_reference(ref.weight.detach())
    mag = (q.double().abs() / s.double()) @ (lv.double().abs() * gamma.double()).t()
    if bias:
        mag += ref.bias.detach().double().abs()
    rel = 1e-6 if mode == "fp32" else 2.0 ** -7
    assert ((yb.double() - ya.double()).abs() <= mag * rel + 1e-6).all()
    # same saved operands and the same upstream gradient: the same two matmuls
    for a, b in zip(ga, gb, strict=True):
        if a is None:
            assert b is None
        elif EXACT:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_3d_input_no_grad_and_shared_slot():
    k, n = 64, 33
    ref_q, tri_q = _pair(k, n, False, seed=1)
    ref_k, tri_k = _pair(k, n, True, seed=2)
    share_act_slot(tri_q, tri_k)
    x = _rand((2, 5, k), 4)
    with torch.no_grad():
        yq, yk = tri_q(x), tri_k(x)
        assert yq.shape == (2, 5, n)
        torch.testing.assert_close(yq, ref_q(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(yk, ref_k(x), rtol=1e-5, atol=1e-6)
    entry = tri_q.act_slot._entry
    assert entry is not None and entry[1][1] == "triton-int8"  # quantised once, for both layers


def test_kernel_choice_and_fallbacks():
    binary, tri = _pair(13, 7, False, QuantConfig(weight="binary"))
    x = _rand((3, 13), 5)
    assert torch.equal(tri(x), binary(x))  # a config the kernels lack keeps the torch path
    ref, tri = _pair(13, 7, False)
    tri.kernel = "auto"
    if DEV == "cpu":
        assert torch.equal(tri(x), ref(x))  # auto: Triton only for CUDA tensors
    else:
        torch.testing.assert_close(tri(x), ref(x), rtol=1e-5, atol=1e-6)
    tri.kernel = "cuda-please"
    with pytest.raises(ValueError, match="kernel must be one of"):
        tri(x)
    assert not tb.supported(QuantConfig(act_bits=4)) and not tb.supported(QuantConfig(scale="channel"))
    with pytest.raises(ValueError):
        set_kernel(ref, "fast")


def _model_cfg(**quant):
    return ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=48, max_seq_len=16,
                       quant=QuantConfig(**quant))


@pytest.mark.parametrize("input_norm", [False, True])
def test_transformer_training_steps_match(input_norm, monkeypatch):
    calls, mm = [], tb.int8_ternary_mm
    monkeypatch.setattr(tb, "int8_ternary_mm", lambda *a: calls.append(1) or mm(*a))
    torch.manual_seed(0)
    a = Transformer(_model_cfg(input_norm=input_norm)).to(DEV)
    b = copy.deepcopy(a)
    assert set_kernel(b, "triton") == 7 and set_kernel(a, "torch") == 7
    idx = torch.randint(0, 64, (2, 9), device=DEV)
    losses = []
    for model in (a, b):
        # SGD: a step proportional to the gradient (Adam's first step is lr * sign(g), which would
        # turn a last-bit difference in a near-zero gradient into a difference of 2 * lr)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        run = []
        for _ in range(2):
            _, loss = model(idx[:, :-1], idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert calls == [1] * 14  # 7 Triton GEMMs per forward, only in the second model
    assert losses[0][1] < losses[0][0] - 1e-3  # the step did something
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-4, msg=name)


# ---- the CUDA lowering, checked without a GPU: compile to PTX for sm_80 and sm_90 ----------------
_AOT = r'''
import re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritlm.kernels.triton import bitlinear as tb, quantize as tq

def ptx(fn, sig, const, cc, **opts):
    sig = {**sig, **{k: "constexpr" for k in const}}
    src = ASTSource(fn, sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts).asm["ptx"]

mm_sig = dict(a_ptr="*i8", b_ptr="*i8", c_ptr="*bf16", s_ptr="*fp32", g_ptr="*fp32", bias_ptr="*fp32", M="i32",
              N="i32", K="i32", stride_am="i32", stride_bn="i32", stride_cm="i32")
for cfg, cc in ((tb._CUDA_CONFIGS[0], 90), (tb._CUDA_CONFIGS[-1], 80)):  # wgmma on Hopper, mma.sync on Ampere
    p = ptx(tb._int8_mm_kernel, mm_sig, dict(HAS_BIAS=True, OUT_DTYPE=tl.bfloat16, **cfg.kwargs), cc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    assert re.search(r"(wgmma|mma)\S*\.s32\.s8\.s8", p), ("no int8 MMA", cfg, cc)
aq_sig = dict(x_ptr="*bf16", w_ptr="*fp32", q_ptr="*i8", s_ptr="*fp32", K="i32", stride_x="i32", stride_q="i32",
              eps="fp32", norm_eps="fp32")
for norm in (False, True):
    p = ptx(tq._act_quant_kernel, aq_sig, dict(NORM=norm, AFFINE=norm, OUT_DTYPE=tl.bfloat16, BLOCK_K=2048), 90,
            num_warps=8, enable_fp_fusion=False)
    assert "fma.rn.f32" not in p and "div.rn.f32" in p
p = ptx(tq._ternarize_kernel, dict(w_ptr="*fp32", ge_ptr="*fp32", lv_ptr="*i8", numel="i32"), dict(BLOCK=1024), 90,
        enable_fp_fusion=False)
assert "div.rn.f32" in p and "div.full" not in p
ptx(tq._ternarize_pack_kernel, dict(w_ptr="*bf16", ge_ptr="*fp32", p_ptr="*u8", N="i32", K="i32", KB="i32",
    stride_w="i32", stride_p="i32"), dict(BLOCK_N=16, BLOCK_B=64), 90, enable_fp_fusion=False)
for row in (False, True):
    ptx(tb._dequant_kernel, dict(q_ptr="*i8", sc_ptr="*fp32", out_ptr="*bf16", M="i32", K="i32"),
        dict(ROW_SCALE=row, OUT_DTYPE=tl.bfloat16, BLOCK_M=16, BLOCK_K=256), 90, enable_fp_fusion=False)
print("ok")
'''


def test_kernels_lower_to_cuda_int8_mma():
    """Compiles every kernel to PTX in a fresh process (no interpreter there): int8 tensor-core MMA
    in the GEMM (the largest tile for sm_90, the smallest for sm_80), IEEE divisions and no FMA
    contraction in the quantisers."""
    import pathlib
    import subprocess
    import sys

    import triton.backends

    if not list(pathlib.Path(triton.backends.__path__[0]).glob("nvidia/bin/ptxas*")):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
