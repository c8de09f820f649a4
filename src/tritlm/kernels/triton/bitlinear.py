"""BitLinear's training step on Triton: an int8 x ternary GEMM forward, a bf16 straight-through backward.

The design follows torchao's BitNet training (``BitNetTrainingLinearWeight``): quantise the
activations per token to int8 and the weights per tensor to int8 levels, multiply on the int8
tensor cores (``tl.dot`` with int32 accumulation: exact, twice the bf16 rate on Ampere / Hopper)
and apply both scales in the epilogue, ``y = acc * gamma / s + b``. That is the BitLinear torch
path's math (``deq(x) @ deq(W)^T``) with the float GEMM replaced by an exact integer sum: the
result is rounded once, where the torch path also rounds ``deq(x)`` and ``deq(W)`` to the compute
dtype (in bf16 the two differ by that rounding, in fp32 by a few ulps).

What is saved for backward is the int8 ``q`` with its ``[M, 1]`` scale and the int8 levels with
gamma: half the bytes of the bf16 copies ``_BitLinearFn`` keeps. Backward rebuilds the bf16 operands
``q / s`` and ``levels * gamma`` with the same float32 arithmetic as the torch path (so, given the
same upstream gradient, the gradients are bit-identical to ``_BitLinearFn``'s; the copies live only
while this layer's backward runs) and runs two bf16 cuBLAS GEMMs: the straight-through gradients
are not integers, and cuBLAS is the best bf16 GEMM there is, so a Triton backward would only add
risk.

The GEMM reads int8 levels rather than the packed ``t2_k4`` bytes: training re-ternarises W every
step and backward needs the levels anyway, and at training batch sizes the GEMM is compute-bound,
so unpacking 2-bit codes in the inner loop would cost tensor-core issue slots to save bandwidth
that is not the bottleneck (packed weights are the inference kernels' business).

Supported: ternary weights with one scale per tensor (no TWN threshold) and 8-bit activations, the
BitNet b1.58 recipe; :func:`supported` says so and BitLinear takes its torch path otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritlm.kernels.triton import interpreting, require
from tritlm.kernels.triton.quantize import _TL_DTYPE, _to, act_quant, ternarize
from tritlm.quant.config import QuantConfig

_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
# the interpreter runs a program per tile in numpy: few, large tiles are fastest there
_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1}


def supported(cfg: QuantConfig) -> bool:
    """True when the Triton kernels implement ``cfg`` (ternary, per tensor, act_bits = 8)."""
    return (cfg.weight == "ternary" and cfg.scale == "tensor" and cfg.dynamic_threshold is None
            and cfg.act_bits == 8)


@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, c_ptr, s_ptr, g_ptr, bias_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                    HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row tiles share each weight tile while it is in L2
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    b = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None]  # [BLOCK_K, BLOCK_N] view of levels^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        av = tl.load(a, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        bv = tl.load(b, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        acc = tl.dot(av, bv, acc, out_dtype=tl.int32)
        a += BLOCK_K
        b += BLOCK_K
    s = tl.load(s_ptr + rm, mask=rm < M, other=1.0)
    y = acc.to(tl.float32) * (tl.load(g_ptr) / s)[:, None]  # exact int32 -> fp32 below 2^24 (K < 132k)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c, _to(y, OUT_DTYPE), mask=(rm[:, None] < M) & (rn[None, :] < N))


_int8_mm_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=["M", "N", "K"])(_int8_mm_kernel)


def int8_ternary_mm(q: torch.Tensor, s: torch.Tensor, levels: torch.Tensor, gamma: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q / s) @ (levels * gamma)^T + bias`` from int8 ``q [M, K]``, float32 ``s [M, 1]``, int8
    ``levels [N, K]`` and a 0-dim float32 ``gamma``; ``[M, N]`` in ``out_dtype``."""
    m, k = q.shape
    n = levels.shape[0]
    if levels.shape[1] != k:
        raise ValueError(f"levels of shape {tuple(levels.shape)} do not fit an input of width {k}")
    q, levels = q.contiguous(), levels.contiguous()
    s = s.reshape(m).float().contiguous()
    g = gamma.reshape(1).float()
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    bias_arg = bias.contiguous() if bias is not None else s  # any pointer when there is no bias
    args = (q, levels, out, s, g, bias_arg, m, n, k, q.stride(0), levels.stride(0), out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, OUT_DTYPE=_TL_DTYPE[out_dtype])
    if q.is_cuda and not interpreting():
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _int8_mm_tuned[grid](*args, **flags)
    else:
        c = _INTERP_CONFIG
        grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
        _int8_mm_kernel[grid](*args, **flags, **c, num_warps=4)
    return out


def int8_ternary_mm_reference(q: torch.Tensor, s: torch.Tensor, levels: torch.Tensor, gamma: torch.Tensor,
                              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The math of :func:`int8_ternary_mm` in float64 (the integer sum is exact there for K < 2^37)."""
    y = (q.double() @ levels.double().t()) * (gamma.double() / s.double().reshape(-1, 1))
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


@triton.jit
def _dequant_kernel(q_ptr, sc_ptr, out_ptr, M, K, ROW_SCALE: tl.constexpr, OUT_DTYPE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    off = rm[:, None].to(tl.int64) * K + rk[None, :]
    v = tl.load(q_ptr + off, mask=mask, other=0).to(tl.float32)
    if ROW_SCALE:  # activations: q / s, an IEEE division as in the torch path
        v = tl.math.div_rn(v, tl.load(sc_ptr + rm, mask=rm < M, other=1.0)[:, None])
    else:  # weights: levels * gamma
        v = v * tl.load(sc_ptr)
    tl.store(out_ptr + off, _to(v, OUT_DTYPE), mask=mask)


def dequant(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(q.float() / s).to(dtype)`` for a ``[M, 1]`` scale ``s``, ``(q.float() * gamma).to(dtype)`` for a
    0-dim ``gamma``, without the float32 temporary."""
    q = q.contiguous()
    m, k = q.shape
    out = torch.empty(m, k, dtype=dtype, device=q.device)
    if q.numel():
        bm, bk = 16, 256
        _dequant_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
            q, scale.float().contiguous(), out, m, k, ROW_SCALE=scale.dim() == 2, OUT_DTYPE=_TL_DTYPE[dtype],
            BLOCK_M=bm, BLOCK_K=bk, num_warps=4, enable_fp_fusion=False)
    return out


class BitLinearTritonFn(torch.autograd.Function):
    """y = (q / s) @ (levels * gamma)^T + b from int8 operands; straight-through bf16 backward.

    ``x`` (2-D) only connects the graph; ``q, s`` is its quantised value, computed outside so that
    layers reading one input can share it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, cfg: QuantConfig, cd: torch.dtype) -> torch.Tensor:
        levels, gamma = ternarize(weight.detach(), cfg.eps)
        y = int8_ternary_mm(q, s, levels, gamma, bias, cd)
        ctx.save_for_backward(q, s, levels, gamma)
        ctx.scale = cfg.ste_scale
        ctx.cd = cd
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        q, s, levels, gamma = ctx.saved_tensors
        x_dt, w_dt, b_dt = ctx.dtypes
        if g.dtype != ctx.cd:
            g = g.to(ctx.cd)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.mm(dequant(levels, gamma, ctx.cd))
            if gx.dtype != x_dt:
                gx = gx.to(x_dt)
        if ctx.needs_input_grad[3]:
            gw = g.t().mm(dequant(q, s, ctx.cd))
            if ctx.scale != 1.0:
                gw.mul_(ctx.scale)
            if gw.dtype != w_dt:
                gw = gw.to(w_dt)
        if ctx.needs_input_grad[4]:
            gb = g.sum(0).to(b_dt)
        return gx, None, None, gw, gb, None, None


def _quantized_input(x: torch.Tensor, x2: torch.Tensor, eps: float, slot) -> tuple[torch.Tensor, torch.Tensor]:
    # same contract as nn.bitlinear._quant_input: one quantisation per input per block, shared
    key = None if slot is None or x.is_inference() else (x._version, "triton-int8", eps)
    if key is not None:
        hit = slot.get(x, key)
        if hit is not None:
            return hit
    qs = act_quant(x2.detach(), eps)
    if key is not None:
        slot.put(x, key, qs)
    return qs


def bitlinear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: QuantConfig,
                     out_dtype: torch.dtype | None = None, slot=None) -> torch.Tensor:
    """BitLinear's hard forward (lambda = 1) on the Triton kernels: ``x [..., K]`` -> ``[..., N]``.

    ``out_dtype``: the compute dtype (default ``x.dtype``; ``BitLinear`` passes its autocast dtype:
    the kernels sit below ``tritlm.nn`` and do not look at autocast themselves).
    ``slot``: an ``ActSlot`` shared by the layers that read ``x`` (quantised once for all of them).
    Autograd runs through :class:`BitLinearTritonFn` when a gradient is needed.
    """
    require(x.device.type)
    if not supported(cfg):
        raise ValueError(f"the Triton BitLinear supports ternary per-tensor weights with act_bits=8, not {cfg}")
    if out_dtype is None:
        out_dtype = x.dtype
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    q, s = _quantized_input(x, x2, cfg.eps, slot)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = BitLinearTritonFn.apply(x2, q, s, weight, bias, cfg, out_dtype)
    else:
        levels, gamma = ternarize(weight.detach(), cfg.eps)
        y = int8_ternary_mm(q, s, levels, gamma, None if bias is None else bias.detach(), out_dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
