"""Per-token absmax activation quantisation (BitNet: int8, s = 127 / max|x| over the last dim)."""

from __future__ import annotations

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def absmax_int8(x: torch.Tensor, bits: int = 8, eps: float = 1e-5,
                as_int: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each token (last dim) to ``bits``-bit signed integers.

    s = Qp / max(max|x|, eps) with Qp = 2^(bits-1) - 1; q = clamp(round(x * s), -Qn, Qp) with
    Qn = 2^(bits-1). Returns ``(q, s)``, s of shape ``[..., 1]``; the dequantised value is q / s.
    ``q`` is a float tensor holding integers (dtype of ``x``), or int8 when ``as_int`` (bits <= 8).
    Half/bfloat16 inputs are quantised in float32 (x * s in 8 mantissa bits would misround), and s is
    returned in float32 for them.
    """
    if bits < 2:
        raise ValueError(f"act_bits must be >= 2, got {bits}")
    if as_int and bits > 8:
        raise ValueError("as_int needs bits <= 8")
    qp, qn = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    s = qp / xf.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    q = (xf * s).round_().clamp_(-qn, qp)
    return (q.to(torch.int8) if as_int else q.to(x.dtype)), s
