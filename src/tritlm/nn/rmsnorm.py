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
