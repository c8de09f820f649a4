"""Weight quantisers: per-tensor ternary (BitNet absmean, TWN threshold) and binary (sign).

Each returns ``(q, scale)`` with ``q`` in the dtype of ``w`` holding the integer levels and ``scale`` a
0-dim tensor; the dequantised weight is ``q * scale``. Pure functions: no modules, no state.
"""

from __future__ import annotations

import torch

from tritlm.quant.config import QuantConfig

Quantised = tuple[torch.Tensor, torch.Tensor]


def absmean_ternary(w: torch.Tensor, eps: float = 1e-5) -> Quantised:
    """BitNet b1.58: gamma = mean|W|, q = clip(round(W / (gamma + eps)), -1, 1), scale = gamma.

    ``torch.round`` rounds half to even, so entries at exactly +-0.5 * (gamma + eps) map to 0.
    """
    gamma = w.abs().mean()
    q = torch.div(w, gamma + eps).round_().clamp_(-1, 1)
    return q, gamma


def threshold_ternary(w: torch.Tensor, t: float = 0.7, eps: float = 1e-5) -> Quantised:
    """Ternary weight networks (Li et al. 2016): a threshold that follows the weight magnitude.

    delta = t * mean|W|; q = sign(W) * (|W| > delta); scale = mean of |W| over the kept entries
    (``eps`` when nothing is kept, so the scale never becomes 0/0).
    """
    a = w.abs()
    keep = a > t * a.mean()
    q = torch.sign(w) * keep
    n = keep.sum()
    kept_sum = (a * keep).sum()
    scale = torch.where(n > 0, kept_sum / n.clamp(min=1).to(kept_sum.dtype),
                        torch.full((), eps, dtype=kept_sum.dtype, device=w.device))
    return q.to(w.dtype), scale


def sign_binary(w: torch.Tensor, eps: float = 1e-5) -> Quantised:
    """1-bit weights: q = +1 where W >= 0 else -1, scale = mean|W|.

    ``eps`` is accepted for a uniform signature; mean|W| is 0 only when W == 0, where q * 0 is exact.
    """
    del eps
    q = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    return q, w.abs().mean()


def quantize_weight(w: torch.Tensor, cfg: QuantConfig) -> Quantised:
    """Dispatch on ``cfg.weight`` / ``cfg.dynamic_threshold``; ``fp`` returns ``(w, 1)``."""
    if cfg.weight == "ternary":
        if cfg.dynamic_threshold is not None:
            return threshold_ternary(w, cfg.dynamic_threshold, cfg.eps)
        return absmean_ternary(w, cfg.eps)
    if cfg.weight == "binary":
        return sign_binary(w, cfg.eps)
    if cfg.weight == "fp":
        return w, torch.ones((), dtype=w.dtype, device=w.device)
    raise ValueError(f"unknown weight mode {cfg.weight!r}")
