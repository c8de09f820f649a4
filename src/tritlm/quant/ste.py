"""Straight-through estimators, soft (tanh) quantisers, lambda mixing and latent clamping.

The schedules that drive them (lambda warm-up, tanh annealing) are in :mod:`tritlm.train.schedule`.
"""

from __future__ import annotations

import math

import torch


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``q`` bit for bit; backward sends ``scale * grad`` to ``x`` and nothing to q."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.x_dtype = x.dtype
        return q.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad if ctx.scale == 1.0 else grad * ctx.scale
        return g.to(ctx.x_dtype), None, None


def ste(x: torch.Tensor, q: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Value ``q``, gradient w.r.t. ``x`` = ``scale`` * incoming gradient (straight-through).

    A custom Function rather than ``x + (q - x).detach()`` so the forward value is exactly ``q``
    (the add/subtract form is off by rounding error).
    """
    if not (x.requires_grad and torch.is_grad_enabled()):
        return q.detach()
    return _StraightThrough.apply(x, q, scale)


def soft_ternary(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """Smooth staircase 0.5 * (tanh(a(u - 1/2)) + tanh(a(u + 1/2))) -> clip(round(u), -1, 1) as a -> inf.

    ``u`` is W / gamma. Used for soft-to-hard annealing: differentiable everywhere, no STE needed.
    """
    return 0.5 * (torch.tanh(alpha * (u - 0.5)) + torch.tanh(alpha * (u + 0.5)))


def soft_binary(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """tanh(alpha * u) -> sign(u) as alpha -> inf."""
    return torch.tanh(alpha * u)


def mix(x: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """Quantisation strength: x + lam * (q - x); lam = 0 is exactly ``x``, lam = 1 exactly ``q``."""
    if lam == 0.0:
        return x
    if lam == 1.0:
        return q
    return x + lam * (q - x)


@torch.no_grad()
def clamp_latent_(w: torch.Tensor, c: float) -> torch.Tensor:
    """Clamp latent weights in place to [-c, c] (keeps them near the quantisation grid)."""
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(f"latent clamp must be a positive finite number, got {c}")
    return w.clamp_(-c, c)
