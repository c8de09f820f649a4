"""Packed Linear kinds for inference: the weights of one block Linear as the runtime holds them.

One :class:`PackedLinear` per layer, whatever its kind:

=========== ============================ ============================ ==========================
kind        levels                       scale (float32)              layout (kernels/pack.py)
=========== ============================ ============================ ==========================
ternary     {-1, 0, 1}, 2 bits           ``[1]`` or ``[n]`` per row   ``i2s_r4``
binary      {-1, 1}, 1 bit               ``[1]`` or ``[n]`` per row   ``b1_k128``
int8        [-127, 127], 8 bits          ``[n]`` per row              ``i8_k32``
int4        [-7, 7], 4 bits              ``[n, ceil(k / g)]``         ``i4_k64``
fp16 / fp32 the float weight ``[n, k]``  none                         ``dense``
=========== ============================ ============================ ==========================

Each has a plain torch reference (:meth:`PackedLinear.reference`: per-token absmax int8
activations times the dequantised weight, the training forward's math) and a CPU kernel
(:meth:`PackedLinear.kernel`, C AVX2 / portable via ``tritlm.kernels.cpu``). The kernel is picked
here by kind; a GPU backend plugs in at the same seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tritlm.kernels.pack import (
    PackedBinary,
    PackedInt4,
    PackedInt8,
    PackedTernary,
    concat_rows,
    pack_binary_kernel,
    pack_int4,
    pack_int8,
    pack_ternary_kernel,
)
from tritlm.quant.config import QuantConfig

KINDS = ("ternary", "binary", "int8", "int4", "fp16", "fp32")
_FP = {"fp16": torch.float16, "fp32": torch.float32}
_PACKED = {"ternary": PackedTernary, "binary": PackedBinary, "int8": PackedInt8, "int4": PackedInt4}


@dataclass
class PackedLinear:
    """The weights of one Linear in its runtime kind (see the module docstring)."""

    kind: str
    weights: Any  # a Packed* of kernels/pack.py, or a float torch.Tensor [n, k] for fp16 / fp32
    scale: np.ndarray | None = None  # float32; None for fp kinds

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown packed kind {self.kind!r}")
        if self.kind in _FP:
            if not isinstance(self.weights, torch.Tensor) or self.weights.dim() != 2:
                raise ValueError(f"{self.kind} weights must be a 2-D tensor")
            return
        if not isinstance(self.weights, _PACKED[self.kind]):
            raise ValueError(f"{self.kind} weights must be a {_PACKED[self.kind].__name__}")
        s = np.ascontiguousarray(self.scale, dtype=np.float32)
        want = {(1,), (self.n,)} if self.kind in ("ternary", "binary") else \
            {(self.n,)} if self.kind == "int8" else {(self.n, self.weights.n_groups)}
        if s.shape not in want:
            raise ValueError(f"{self.kind} [{self.n}, {self.k}]: scale of shape {s.shape}, expected one of "
                             f"{sorted(want)}")
        self.scale = s

    # ---------------------------------------------------------------- shape and size
    @property
    def n(self) -> int:
        return int(self.weights.shape[0]) if self.kind in _FP else self.weights.n

    @property
    def k(self) -> int:
        return int(self.weights.shape[1]) if self.kind in _FP else self.weights.k

    @property
    def group_size(self) -> int | None:
        return self.weights.group_size if self.kind == "int4" else None

    @property
    def layout(self) -> str:
        return "dense" if self.kind in _FP else self.weights.layout

    @property
    def bits(self) -> int:
        return {"ternary": 2, "binary": 1, "int8": 8, "int4": 4, "fp16": 16, "fp32": 32}[self.kind]

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed levels (padding included) plus scales."""
        if self.kind in _FP:
            return self.weights.numel() * self.weights.element_size()
        return int(self.weights.nbytes) + 4 * int(self.scale.size)

    @property
    def ideal_bytes(self) -> float:
        """``bits`` per weight without padding, plus the scales."""
        return self.bits * self.n * self.k / 8 + (0 if self.scale is None else 4 * int(self.scale.size))

    def describe(self) -> dict:
        """The per-tensor record of packed format v2 (``config.json`` ``tensors``)."""
        return {"kind": self.kind, "bits": self.bits, "layout": self.layout, "shape": [self.n, self.k],
                "scale_shape": None if self.scale is None else list(self.scale.shape),
                "group_size": self.group_size}

    # ---------------------------------------------------------------- values
    def levels(self) -> np.ndarray:
        """int8 levels ``[n, k]`` of a quantised kind."""
        if self.kind in _FP:
            raise ValueError(f"a {self.kind} layer has no integer levels")
        return self.weights.unpack()

    def row_scales(self) -> np.ndarray:
        """``[n]`` per-row scales (ternary / binary / int8), a per-tensor scale repeated."""
        if self.kind not in ("ternary", "binary", "int8"):
            raise ValueError(f"{self.kind} has no per-row scale")
        return np.broadcast_to(self.scale, (self.n,)).astype(np.float32) if self.scale.size == 1 \
            else self.scale

    def dequant(self) -> torch.Tensor:
        """float32 ``[n, k]``: the weight the layer multiplies by."""
        if self.kind in _FP:
            return self.weights.float()
        q = torch.from_numpy(self.levels().astype(np.float32))
        s = torch.from_numpy(self.scale)
        if self.kind == "int4":
            return q * s.repeat_interleave(self.group_size, dim=1)[:, :self.k]
        return q * (s if s.numel() == 1 else s.view(-1, 1))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain torch forward (the kernels' reference): int8 per-token activations for quantised
        kinds (BitLinear's ``act_bits=8``), float activations for fp kinds; float32 ``[.., n]``."""
        x = x.float()
        if self.kind not in _FP:
            s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
            x = (x * s).round().clamp(-128, 127) / s
        return x @ self.dequant().t()

    # ---------------------------------------------------------------- runtime
    def kernel(self, threads: int | None = None, backend: str | None = None):
        """The CPU kernel object for this kind: ``kernel(x, out)`` with float32 ``x`` ``[M, k]``."""
        from tritlm.kernels.cpu import (
            BinaryLinearKernel,
            Int4LinearKernel,
            Int8LinearKernel,
            TernaryLinearKernel,
        )
        from tritlm.kernels.cpu.f16 import F16MatMul

        kw = {"threads": threads, "backend": backend}
        if self.kind == "ternary":
            return TernaryLinearKernel(self.weights, self.row_scales(), **kw)
        if self.kind == "binary":
            return BinaryLinearKernel(self.weights, self.row_scales(), **kw)
        if self.kind == "int8":
            return Int8LinearKernel(self.weights, self.scale, **kw)
        if self.kind == "int4":
            return Int4LinearKernel(self.weights, self.scale, self.group_size, **kw)
        if self.kind == "fp16":
            return F16MatMul(self.weights)
        return None  # fp32: the caller's float32 matmul

    def fusable_with(self, other: PackedLinear) -> bool:
        """Whether two layers that share an input can run as one row-concatenated kernel."""
        return (self.kind == other.kind and self.k == other.k and self.group_size == other.group_size
                and self.kind not in _FP)


def concat_linears(parts: list[PackedLinear]) -> PackedLinear:
    """Row-concatenate layers of one quantised kind that share K (q|k|v, gate|up)."""
    first = parts[0]
    if not all(first.fusable_with(p) for p in parts[1:]):
        raise ValueError("concat_linears: parts must share a quantised kind, K and group size")
    if len(parts) == 1:
        return first
    w = concat_rows([p.weights for p in parts])
    if first.kind == "int4":
        scale = np.concatenate([p.scale for p in parts], axis=0)
    else:
        scale = np.concatenate([p.row_scales() for p in parts])
    return PackedLinear(first.kind, w, scale)


def pack_levels(q: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray, cfg: QuantConfig) -> PackedLinear:
    """Integer levels + scale from :func:`tritlm.quant.weights.quantize_weight` -> PackedLinear."""
    q = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    q = q.astype(np.int8)
    s = scale.detach().cpu().float().numpy() if isinstance(scale, torch.Tensor) else np.asarray(scale, np.float32)
    n = q.shape[0]
    if cfg.weight == "ternary":
        return PackedLinear("ternary", pack_ternary_kernel(q), s.reshape(-1) if s.size == n else s.reshape(1))
    if cfg.weight == "binary":
        return PackedLinear("binary", pack_binary_kernel(q), s.reshape(-1) if s.size == n else s.reshape(1))
    if cfg.weight == "int8":
        return PackedLinear("int8", pack_int8(q), s.reshape(n))
    if cfg.weight == "int4":
        return PackedLinear("int4", pack_int4(q, cfg.group_size), s.reshape(n, -1))
    raise ValueError(f"{cfg.weight} weights have no integer levels")


@torch.no_grad()
def pack_module(mod: torch.nn.Module, fp_dtype: str = "fp16") -> PackedLinear:
    """A trained Linear (BitLinear of any kind, or a plain ``nn.Linear``) -> its PackedLinear.

    FP layers keep their weight in ``fp_dtype`` (fp16 or fp32; bf16 is stored as fp32).
    """
    cfg = getattr(mod, "config", None)
    if cfg is not None and cfg.quantised:
        q, s = mod.quantized_weight()
        return pack_levels(q, s, cfg)
    kind = "fp16" if fp_dtype == "fp16" else "fp32"
    return PackedLinear(kind, mod.weight.detach().to(_FP[kind]).contiguous().clone())
