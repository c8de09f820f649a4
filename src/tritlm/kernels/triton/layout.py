"""The GPU weight layout of ternary levels, ``t2_k4``, in plain torch (the kernels' reference).

``uint8 [n, ceil(k / 4)]``: byte ``(r, j)`` holds ``w[r, 4j + i] + 1`` (0, 1 or 2) in bits
``2i .. 2i+1``; the padding past ``k`` holds code 1 (level 0). Rows stay contiguous along K, so a
GEMV program reads its rows in coalesced runs, and a kernel recovers level ``(r, c)`` as
``((byte[r, c // 4] >> 2 * (c % 4)) & 3) - 1``.
"""

from __future__ import annotations

import torch

LAYOUT = "t2_k4"


def pack_t2(levels: torch.Tensor) -> torch.Tensor:
    """int levels in {-1, 0, 1}, ``[n, k]`` -> ``uint8 [n, ceil(k / 4)]`` (on the same device)."""
    if levels.dim() != 2:
        raise ValueError(f"levels must be 2-D, got shape {tuple(levels.shape)}")
    n, k = levels.shape
    lv = levels.to(torch.int16)
    if bool(((lv < -1) | (lv > 1)).any()):
        raise ValueError("ternary levels must lie in {-1, 0, 1}")
    kp = (k + 3) // 4 * 4
    codes = torch.ones(n, kp, dtype=torch.int16, device=levels.device)
    codes[:, :k] = lv + 1
    codes = codes.view(n, kp // 4, 4)
    out = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return out.to(torch.uint8).contiguous()


def unpack_t2(packed: torch.Tensor, k: int) -> torch.Tensor:
    """``uint8 [n, ceil(k / 4)]`` -> int8 levels ``[n, k]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError("packed t2_k4 weights must be a 2-D uint8 tensor")
    if packed.shape[1] != (k + 3) // 4:
        raise ValueError(f"packed width {packed.shape[1]} does not hold k = {k}")
    p = packed.to(torch.int16)
    codes = torch.stack([(p >> (2 * i)) & 3 for i in range(4)], dim=-1).view(packed.shape[0], -1)
    return (codes[:, :k] - 1).to(torch.int8)
