"""Weight quantisers: ternary (BitNet absmean, TWN threshold), binary (sign), int8 (absmax per output
channel) and int4 (absmax per group along the input dimension).

Each returns ``(q, scale)`` with ``q`` in the dtype of ``w`` holding the integer levels and ``scale``
shaped to say its granularity: 0-dim (per tensor), ``[out, 1]`` (per output channel) or
``[out, n_groups]`` (per group; the last group of a row may be short). :func:`dequantize` turns any
of them back into ``q * scale``. Pure functions: no modules, no state.
"""

from __future__ import annotations

import torch

from tritlm.quant.config import QuantConfig

Quantised = tuple[torch.Tensor, torch.Tensor]


def _mean_abs(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    a = w.abs()
    return a.mean(dim=-1, keepdim=True) if per_channel else a.mean()


def absmean_ternary(w: torch.Tensor, eps: float = 1e-5, per_channel: bool = False) -> Quantised:
    """BitNet b1.58: gamma = mean|W|, q = clip(round(W / (gamma + eps)), -1, 1), scale = gamma.

    ``per_channel``: one gamma per output row (``[out, 1]``) instead of one per tensor.
    ``torch.round`` rounds half to even, so entries at exactly +-0.5 * (gamma + eps) map to 0.
    """
    gamma = _mean_abs(w, per_channel)
    q = torch.div(w, gamma + eps).round_().clamp_(-1, 1)
    return q, gamma


def threshold_ternary(w: torch.Tensor, t: float = 0.7, eps: float = 1e-5, per_channel: bool = False) -> Quantised:
    """Ternary weight networks (Li et al. 2016): a threshold that follows the weight magnitude.

    delta = t * mean|W|; q = sign(W) * (|W| > delta); scale = mean of |W| over the kept entries
    (``eps`` when nothing is kept, so the scale never becomes 0/0). ``per_channel``: per row.
    """
    a = w.abs()
    dims = dict(dim=-1, keepdim=True) if per_channel else {}
    keep = a > t * a.mean(**dims)
    q = torch.sign(w) * keep
    n = keep.sum(**dims)
    kept_sum = (a * keep).sum(**dims)
    scale = torch.where(n > 0, kept_sum / n.clamp(min=1).to(kept_sum.dtype),
                        torch.full((), eps, dtype=kept_sum.dtype, device=w.device))
    return q.to(w.dtype), scale


def sign_binary(w: torch.Tensor, eps: float = 1e-5, per_channel: bool = False) -> Quantised:
    """1-bit weights: q = +1 where W >= 0 else -1, scale = mean|W| (per tensor or per row).

    ``eps`` is accepted for a uniform signature; mean|W| is 0 only when W == 0, where q * 0 is exact.
    """
    del eps
    q = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    return q, _mean_abs(w, per_channel)


def absmax_int8_weight(w: torch.Tensor, eps: float = 1e-5) -> Quantised:
    """Symmetric int8 per output channel: s_r = max|W_r| / 127, q = clip(round(W / s_r), -127, 127).

    A row of zeros gets s = eps / 127 (q = 0 there, so the dequantised row is exactly 0).
    """
    s = w.abs().amax(dim=-1, keepdim=True).clamp(min=eps) / 127.0
    q = torch.div(w, s).round_().clamp_(-127, 127)
    return q, s


def absmax_int4(w: torch.Tensor, group_size: int = 64, eps: float = 1e-5) -> Quantised:
    """Symmetric int4 per group of ``group_size`` weights along K: s = max|W_g| / 7,
    q = clip(round(W / s), -7, 7). Returns ``q`` ``[out, K]`` and ``s`` ``[out, ceil(K / group_size)]``.

    Levels stay in [-7, 7] (no -8) so that a group is symmetric and maps exactly onto llama.cpp's
    Q4_0 (value = (nibble - 8) * d) and onto any group size that is a multiple of 32.
    """
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    out, k = w.shape
    g = -(-k // group_size)
    pad = g * group_size - k
    wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
    wg = wp.reshape(out, g, group_size)
    s = wg.abs().amax(dim=-1).clamp(min=eps) / 7.0
    q = torch.div(wg, s.unsqueeze(-1)).round_().clamp_(-7, 7).reshape(out, g * group_size)
    return (q[:, :k] if pad else q).contiguous(), s


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], group_size: int | None = None) -> torch.Tensor:
    """A scale of any granularity (0-dim, ``[out, 1]``, ``[out, groups]``) broadcastable to ``shape``.

    Group scales need ``group_size`` (the last group of a row may be short, so the shape alone
    does not say it).
    """
    if scale.dim() == 2 and scale.shape[1] > 1:
        if group_size is None:
            raise ValueError("group scales need group_size")
        k = shape[-1]
        if scale.shape[1] != -(-k // group_size):
            raise ValueError(f"{scale.shape[1]} group scales do not fit K = {k} with groups of {group_size}")
        return scale.repeat_interleave(group_size, dim=1)[:, :k]
    return scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """``q * scale`` for every granularity :func:`quantize_weight` returns."""
    return q * expand_scale(scale, tuple(q.shape), group_size)


def quantize_weight(w: torch.Tensor, cfg: QuantConfig) -> Quantised:
    """Dispatch on ``cfg.weight`` (and ``scale`` / ``group_size`` / ``dynamic_threshold``);
    ``fp`` returns ``(w, 1)``."""
    ch = cfg.scale == "channel"
    if cfg.weight == "ternary":
        if cfg.dynamic_threshold is not None:
            return threshold_ternary(w, cfg.dynamic_threshold, cfg.eps, per_channel=ch)
        return absmean_ternary(w, cfg.eps, per_channel=ch)
    if cfg.weight == "binary":
        return sign_binary(w, cfg.eps, per_channel=ch)
    if cfg.weight == "int8":
        return absmax_int8_weight(w, cfg.eps)
    if cfg.weight == "int4":
        return absmax_int4(w, cfg.group_size, cfg.eps)
    if cfg.weight == "fp":
        return w, torch.ones((), dtype=w.dtype, device=w.device)
    raise ValueError(f"unknown weight mode {cfg.weight!r}")
