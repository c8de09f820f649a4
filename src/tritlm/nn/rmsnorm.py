"""RMSNorm (Zhang & Sennrich 2019), computed in float32 for stability under bf16 autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        # F.rms_norm is one fused kernel; the float() casts are no-ops for float32 inputs.
        return F.rms_norm(x.float(), (self.dim,), w, self.eps).to(x.dtype)


class SubNorm(RMSNorm):
    """SubLN (RMSNorm before o_proj / down_proj) that can be blended in: ``x + lam * (norm(x) - x)``.

    Fine-tuning inserts SubLN into a model that was trained without it; ramping ``lam`` with the
    quantisation strength keeps the student equal to the source at lambda = 0. ``lam`` is runtime
    state set by the trainer (like BitLinear's), not saved: a loaded model is always at lambda = 1,
    which is plain RMSNorm. Only norms marked ``inserted`` follow the schedule: a model trained
    with SubLN from scratch keeps its norms whole.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        self.lam: float = 1.0
        self.inserted = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.lam == 1.0 else torch.lerp(x, y, self.lam)
