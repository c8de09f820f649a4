"""fp16-weight matmul (``tritlm_f16.c``): ``y = x @ W^T`` with W stored as fp16, x and y float32.

The LM head of a packed model is stored in fp16; this reads it as such (half the bytes of the
float32 copy a BLAS call needs) and widens it in registers. The reference is
:func:`f16_matmul_ref` (float64 math over the same fp16 weights).
"""

from __future__ import annotations

import numpy as np
import torch

from . import build
from .ops import AVX2_BACKENDS, resolve_backend


def f16_matmul_ref(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 reference of ``x @ w^T`` (w fp16 [N, K], x [M, K]) -> float32 [M, N]."""
    return (x.double() @ w.double().t()).float()


class F16MatMul:
    """Holds an fp16 ``[N, K]`` weight; ``__call__(x [M, K] float32, out [M, N] float32)``.

    Falls back to a float32 torch matmul (keeping a float32 copy) where the C library is missing.
    """

    def __init__(self, w: torch.Tensor, threads: int | None = None, backend: str | None = None):
        if w.dim() != 2:
            raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
        self.w = w.detach().to(torch.float16).contiguous()
        self.n, self.k = self.w.shape
        self.threads = threads
        be = resolve_backend(backend)
        self._lib = build.load_library() if be != "numpy" else None
        # 2: the AVX-512 rows (avx512 and amx routes; the C side falls back to AVX2 on CPUs without)
        self._isa = 2 if be in ("avx512", "amx") else int(be in AVX2_BACKENDS)
        self._w32 = None if self._lib is not None else self.w.float()
        self._ptr = self.w.data_ptr()

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"expected activations [M, {self.k}], got shape {tuple(x.shape)}")
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        m = x.shape[0]
        if out is None:
            out = torch.empty(m, self.n)
        elif tuple(out.shape) != (m, self.n) or out.dtype is not torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of shape {(m, self.n)}")
        if self._lib is None:
            return torch.mm(x, self._w32.t(), out=out)
        if self._lib.tt_f16_matmul(self._ptr, self.n, self.k, x.data_ptr(), m, self.k, out.data_ptr(),
                                   self.threads or 0, self._isa):
            raise ValueError("tt_f16_matmul rejected its arguments")
        return out

    @property
    def weight_nbytes(self) -> int:
        """Bytes the C GEMV reads (0 on the torch fallback: nothing to move)."""
        return self.w.numel() * 2 if self._lib is not None else 0

    @property
    def weight_ptr(self) -> int:
        return self._ptr

    def move_weights(self, dest: torch.Tensor) -> None:
        """Copy the fp16 weight into ``dest`` (a uint8 tensor of :attr:`weight_nbytes`, e.g. a
        piece of a huge-page :class:`~tritlm.hugepages.Arena`) and read it from there."""
        if self._lib is None:
            return
        if dest.dtype != torch.uint8 or dest.numel() != self.weight_nbytes:
            raise ValueError(f"move_weights needs {self.weight_nbytes} bytes (uint8), got {dest.numel()}")
        w = dest.view(torch.float16).view(self.w.shape)
        w.copy_(self.w)
        self.w, self._ptr = w, w.data_ptr()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.w.shape)) * 2
