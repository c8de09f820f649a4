"""Triton quantisers for ternary training: per-token absmax int8 activations (optionally behind an
RMSNorm) and per-tensor absmean ternary weights (as int8 levels or straight into ``t2_k4``).

Each kernel is bit-identical to the torch code that BitLinear's torch path runs (the ``*_reference``
functions here restate it), so switching a model between kernels changes only the GEMM rounding:

- ``s = 127 * (1 / max(max|x|, eps))``: ``absmax_int8`` and ``_dequant_act`` compute ``Qp / m`` as
  ``reciprocal(m) * Qp``, so the kernel does the same, with ``div_rn`` because Triton's ``/`` on
  fp32 is an approximate division on CUDA.
- ``round`` is half-to-even (``torch.round``), written with ``floor`` (``_rne``): ``libdevice.rint``
  has no interpreter implementation, and the floor form is exact for every fp32 below 2^23.
- the quantisers compile without FMA contraction (``enable_fp_fusion=False``): fused, ``x * s - floor``
  would see the unrounded product and settle ties that torch rounds first (sm_90 PTX has 16 such fma
  in ``_act_quant_kernel`` otherwise). They are memory-bound, so it costs nothing.
- gamma = mean|W| stays a torch reduction: a Triton tree sums in another order and would move gamma
  by an ulp, which flips levels that sit on a rounding tie. It is one read of W, and gamma + eps
  goes to the kernels as a device tensor, so nothing waits on the host.

Activation rows are walked in chunks (two passes, three with the norm: sum of squares, max, write),
so any width works; the re-reads of a row hit L2. The RMSNorm is fused for inference and benches;
BitLinear's training path keeps its torch RMSNorm, whose backward would otherwise need the fp input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritlm.kernels.triton.layout import pack_t2

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rne(v):
    """round half to even, exactly, for |v| < 2^23."""
    f = tl.floor(v)
    d = v - f  # exact: f and v share the exponent range
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def _to(v, DT: tl.constexpr):
    """fp32 -> DT rounding to nearest even, as torch's ``.to``.

    bfloat16 is rounded by hand: the interpreter truncates (and its "rtne" rounds ties up), while
    on CUDA this is the same round-to-nearest-even the cvt instruction does, at a few ALU ops.
    """
    if DT == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        r = tl.where(v == v, b + 0x7FFF + ((b >> 16) & 1), b | 0x400000)  # NaN stays NaN
        return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DT)


@triton.jit
def _normed(xr, w_ptr, c, K, r, NORM: tl.constexpr, AFFINE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Columns ``c`` of the row as float32, after the RMSNorm (``r`` = its reciprocal rms) when
    ``NORM``: rounded to x's dtype, as RMSNorm returns it before absmax reads it."""
    v = tl.load(xr + c, mask=c < K, other=0.0).to(tl.float32)
    if NORM:
        v = v * r
        if AFFINE:
            v = v * tl.load(w_ptr + c, mask=c < K, other=0.0).to(tl.float32)
        v = _to(v, OUT_DTYPE).to(tl.float32)
    return v


@triton.jit
def _act_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, K, stride_x, stride_q, eps, norm_eps,
                      NORM: tl.constexpr, AFFINE: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_K)
    r = 1.0
    if NORM:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c = k0 + cols
            v = tl.load(xr + c, mask=c < K, other=0.0).to(tl.float32)
            acc += v * v
        r = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / K + norm_eps)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        v = _normed(xr, w_ptr, c, K, r, NORM, AFFINE, OUT_DTYPE)
        amax = tl.maximum(amax, tl.abs(v))
    s = tl.math.div_rn(1.0, tl.maximum(tl.max(amax, axis=0), eps)) * 127.0
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        v = _normed(xr, w_ptr, c, K, r, NORM, AFFINE, OUT_DTYPE)
        q = tl.minimum(tl.maximum(_rne(v * s), -128.0), 127.0)
        tl.store(q_ptr + row * stride_q + c, q.to(tl.int8), mask=c < K)


def act_quant(x: torch.Tensor, eps: float = 1e-5, norm: bool | torch.Tensor = False,
              norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8: ``x [M, K]`` -> ``(int8 q [M, K], float32 s [M, 1])``, q / s ~ x.

    ``norm``: False, True (parameter-free RMSNorm first, BitLinear's ``input_norm``) or the weight of
    an affine RMSNorm (``[K]``); ``norm_eps`` is the norm's epsilon (RMSNorm's default 1e-6).
    """
    if x.dim() != 2:
        raise ValueError(f"act_quant takes a 2-D input, got shape {tuple(x.shape)}")
    if x.dtype not in _TL_DTYPE:
        raise ValueError(f"act_quant takes float32, bfloat16 or float16, got {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    affine = isinstance(norm, torch.Tensor)
    w = norm.contiguous() if affine else x  # any pointer when there is no weight
    if m and k:
        block = min(triton.next_power_of_2(k), 2048)
        _act_quant_kernel[(m,)](x, w, q, s, k, x.stride(0), q.stride(0), float(eps), float(norm_eps),
                                NORM=affine or bool(norm), AFFINE=affine, OUT_DTYPE=_TL_DTYPE[x.dtype],
                                BLOCK_K=block, num_warps=4 if block <= 1024 else 8, enable_fp_fusion=False)
    elif m:
        s.fill_(127.0 / eps)
    return q, s


def act_quant_reference(x: torch.Tensor, eps: float = 1e-5, norm: bool | torch.Tensor = False,
                        norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch math ``act_quant`` reproduces: RMSNorm of nn/rmsnorm.py (optional), then absmax_int8."""
    if isinstance(norm, torch.Tensor) or norm:
        w = norm.float() if isinstance(norm, torch.Tensor) else None
        x = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), w, norm_eps).to(x.dtype)
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    s = 127 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    q = (xf * s).round_().clamp_(-128, 127)
    return q.to(torch.int8), s


@triton.jit
def _ternarize_kernel(w_ptr, ge_ptr, lv_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    v = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.minimum(tl.maximum(_rne(tl.math.div_rn(v, tl.load(ge_ptr))), -1.0), 1.0)
    tl.store(lv_ptr + offs, lv.to(tl.int8), mask=mask)


@triton.jit
def _ternarize_pack_kernel(w_ptr, ge_ptr, p_ptr, N, K, KB, stride_w, stride_p,
                           BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    byts = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    ge = tl.load(ge_ptr)
    code = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.int32)
    for i in tl.static_range(4):
        c = byts * 4 + i
        mask = (rows[:, None] < N) & (c[None, :] < K)
        v = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + c[None, :], mask=mask, other=0.0)
        lv = tl.minimum(tl.maximum(_rne(tl.math.div_rn(v.to(tl.float32), ge)), -1.0), 1.0)
        code = code | ((lv.to(tl.int32) + 1) << (2 * i))  # padding past K loads 0 -> code 1
    out = p_ptr + rows[:, None].to(tl.int64) * stride_p + byts[None, :]
    tl.store(out, code.to(tl.uint8), mask=(rows[:, None] < N) & (byts[None, :] < KB))


def _gamma(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gamma, gamma + eps) as float32 0-dim device tensors, exactly as ``_dequant_weight`` has them."""
    wf = w.float() if w.dtype in _LOW_PRECISION else w
    gamma = wf.abs().mean()
    return gamma, gamma.add(eps)


def _check_weight(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2:
        raise ValueError(f"ternarize takes a 2-D weight, got shape {tuple(w.shape)}")
    if w.dtype not in _TL_DTYPE:
        raise ValueError(f"ternarize takes float32, bfloat16 or float16, got {w.dtype}")
    return w.contiguous()


def ternarize(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary per tensor: ``w [N, K]`` -> ``(int8 levels [N, K], float32 gamma 0-dim)``."""
    w = _check_weight(w)
    gamma, ge = _gamma(w, eps)
    lv = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    n = w.numel()
    if n:
        block = 1024
        _ternarize_kernel[(triton.cdiv(n, block),)](w, ge, lv, n, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return lv, gamma


def ternarize_pack(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`ternarize`, written straight into ``t2_k4``: ``(uint8 [N, ceil(K / 4)], gamma)``."""
    w = _check_weight(w)
    gamma, ge = _gamma(w, eps)
    n, k = w.shape
    kb = (k + 3) // 4
    p = torch.empty(n, kb, dtype=torch.uint8, device=w.device)
    if n and k:
        bn, bb = 16, 64
        _ternarize_pack_kernel[(triton.cdiv(n, bn), triton.cdiv(kb, bb))](
            w, ge, p, n, k, kb, w.stride(0), p.stride(0), BLOCK_N=bn, BLOCK_B=bb, num_warps=4, enable_fp_fusion=False)
    return p, gamma


def ternarize_reference(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch math of ``_dequant_weight`` (ternary, per tensor) before the scale is multiplied in."""
    wf = w.float() if w.dtype in _LOW_PRECISION else w
    gamma = wf.abs().mean()
    return torch.div(wf, gamma.add(eps)).round_().clamp_(-1, 1).to(torch.int8), gamma


def ternarize_pack_reference(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    lv, gamma = ternarize_reference(w, eps)
    return pack_t2(lv), gamma
