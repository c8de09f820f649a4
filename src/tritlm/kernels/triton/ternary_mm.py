"""Packed ternary (2-bit ``t2_k4``) weights times per-token int8 activations, for inference.

``y = (round(x * s) / s) @ (levels * scale)^T`` with ``s = 127 / max(max|x|, 1e-5)`` per token:
the math of :meth:`tritlm.nn.packed_linear.PackedLinear.reference`, which :func:`ternary_linear_reference`
restates on the packed tensors.

Two kernels, split by M because the cost model differs:

* ``_gemv`` (decode, M <= 16): memory-bound, so the 2-bit weights are read once and the
  activations' quantisation is fused in: every program re-reads the few activation rows (they stay
  in L2) to find their absmax, then quantises them chunk by chunk as it walks K. M = 1 multiplies
  on the CUDA cores (a tensor-core tile would be 15/16 padding); 2..16 rows use an int8
  ``tl.dot`` on one 16-row tile.
* ``_gemm`` (prefill): compute-bound, so the activations are quantised once up front (re-reading
  them per output tile would cost N / BLOCK_N passes) and the tiles run int8 ``tl.dot`` with int32
  accumulation; each weight tile is unpacked in registers from bytes read once per K block.

The integer products are exact in int32; the float epilogue multiplies by ``scale / s``. Rounding
uses the 1.5 * 2^23 trick (round half to even, as ``torch.round``) because it means the same thing
on CUDA and in the interpreter; the GEMV compiles without FMA contraction, which would fuse
``x * s + 1.5 * 2^23`` into one rounding and so round some products differently from torch, and
divides with ``div_rn`` (Triton's ``/`` is approximate on CUDA).
"""

from __future__ import annotations

import torch

from tritlm.kernels.triton import require
from tritlm.kernels.triton.layout import unpack_t2

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: ternary_linear() raises the one-line error of require()
    triton = None

SMALL_M = 16


def ternary_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """Plain torch: float32 ``[M, n]`` for ``x [M, k]``, ``packed`` t2_k4 ``[n, ceil(k/4)]`` and
    ``scale`` float32 ``[1]`` or ``[n]``."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    xq = (xf * s).round().clamp(-128, 127)
    w = unpack_t2(packed, k).float()
    return (xq / s) @ (w * scale.float().view(-1, 1)).t()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 of ``x [M, K]``: ``(q int8 [M, K], s float32 [M])`` (the GEMM's input)."""
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1).clamp(min=1e-5)
    return (xf * s[:, None]).round().clamp(-128, 127).to(torch.int8), s


if triton is not None:
    _ROUND = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + R) - R rounds |v| < 2^22 to an integer, ties to even

    @triton.jit
    def _unpack(w_ptr, rn, rk, N, K, KB):
        """Levels ``[BK, BN]`` (int8) of rows ``rn`` at columns ``rk`` from t2_k4 bytes."""
        b = tl.load(w_ptr + rn[None, :] * KB + (rk // 4)[:, None], mask=(rn[None, :] < N) & (rk[:, None] < K),
                    other=85)  # 0b01010101: code 1 everywhere, level 0
        return (((b >> ((rk % 4) * 2)[:, None].to(tl.uint8)) & 3).to(tl.int8) - 1).to(tl.int8)

    @triton.jit
    def _gemv(x_ptr, w_ptr, sc_ptr, o_ptr, M, N, K, KB, sxm, som,
              PER_ROW: tl.constexpr, DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        rm = tl.arange(0, BM)
        rn = pid * BN + tl.arange(0, BN)
        amax = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xv = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                         other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xv), axis=1))
        s = tl.math.div_rn(127.0, tl.maximum(amax, 1e-5))  # Triton's "/" is approximate on CUDA
        if DOT:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            acc1 = tl.zeros((BN,), dtype=tl.int32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xv = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                         other=0.0).to(tl.float32)
            q = (xv * s[:, None] + _ROUND) - _ROUND
            q = tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)
            w = _unpack(w_ptr, rn, rk, N, K, KB)
            if DOT:
                acc = tl.dot(q, w, acc, out_dtype=tl.int32)
            else:
                q0 = tl.sum(q.to(tl.int32), axis=0)  # BM == 1: the one row, as [BK]
                acc1 += tl.sum(q0[:, None] * w.to(tl.int32), axis=0)
        if PER_ROW:
            sc = tl.load(sc_ptr + rn, mask=rn < N, other=0.0)
        else:
            sc = tl.load(sc_ptr + rn * 0)
        if DOT:
            y = tl.math.div_rn(acc.to(tl.float32), s[:, None]) * sc[None, :]
            tl.store(o_ptr + rm[:, None] * som + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))
        else:
            s0 = tl.sum(s, axis=0)
            y1 = tl.math.div_rn(acc1.to(tl.float32), s0) * sc
            tl.store(o_ptr + rn, y1, mask=rn < N)

    @triton.jit
    def _gemm(q_ptr, s_ptr, w_ptr, sc_ptr, o_ptr, M, N, K, KB, sqm, som,
              PER_ROW: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(q_ptr + rm[:, None] * sqm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
            acc = tl.dot(a, _unpack(w_ptr, rn, rk, N, K, KB), acc, out_dtype=tl.int32)
        s = tl.load(s_ptr + rm, mask=rm < M, other=1.0)
        if PER_ROW:
            sc = tl.load(sc_ptr + rn, mask=rn < N, other=0.0)
        else:
            sc = tl.load(sc_ptr + rn * 0)
        y = tl.math.div_rn(acc.to(tl.float32), s[:, None]) * sc[None, :]
        tl.store(o_ptr + rm[:, None] * som + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _blocks(device_type: str, small: bool, m: int) -> dict:
    """Fixed tile sizes: the interpreter wants few, big programs; CUDA wants enough programs to fill
    the SMs (decode: a thin N slice each)."""
    if device_type != "cuda":
        return dict(BN=128, BK=128) if small else dict(BM=32, BN=128, BK=128)
    if small:
        return dict(BN=64, BK=128, num_warps=4)
    return dict(BM=128 if m >= 128 else 64, BN=128, BK=64, num_warps=8, num_stages=3)


def ternary_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[M, n]`` = the reference's math on the device of ``x`` (CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``). ``x`` float ``[M, k]``; ``packed`` uint8 t2_k4 ``[n, ceil(k/4)]``;
    ``scale`` float32 ``[1]`` or ``[n]``."""
    require(x.device.type)
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    n, kb = packed.shape
    if kb != (k + 3) // 4:
        raise ValueError(f"packed width {kb} does not hold k = {k}")
    if scale.numel() not in (1, n):
        raise ValueError(f"scale must have 1 or {n} elements, got {scale.numel()}")
    x = x.contiguous()
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    per_row = scale.numel() == n and n != 1
    if m <= SMALL_M:
        b = _blocks(x.device.type, True, m)
        dot = m > 1
        bm = 16 if dot else 1
        _gemv[(triton.cdiv(n, b["BN"]),)](x, packed, scale, out, m, n, k, kb, x.stride(0), out.stride(0),
                                          PER_ROW=per_row, DOT=dot, BM=bm, enable_fp_fusion=False, **b)
        return out
    q, s = quantize_rows(x)
    b = _blocks(x.device.type, False, m)
    grid = (triton.cdiv(m, b["BM"]), triton.cdiv(n, b["BN"]))
    _gemm[grid](q, s, packed, scale, out, m, n, k, kb, q.stride(0), out.stride(0), PER_ROW=per_row, **b)
    return out
