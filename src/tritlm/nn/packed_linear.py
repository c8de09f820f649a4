"""Packed Linear kinds for inference: the weights of one block Linear as the runtime holds them.

One :class:`PackedLinear` per layer, whatever its kind:

=========== ============================ ============================ ==========================
kind        levels                       scale (float32)              layout (kernels/pack.py)
=========== ============================ ============================ ==========================
ternary     {-1, 0, 1}, 2 bits           ``[1]`` or ``[n]`` per row   ``i2s_r4`` (``base3``: 1.6 bits
                                                                      stored, unpacked to run)
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

from tritlm.kernels.pack import PackedBase3, PackedTernary, pack_base3_rows, pack_ternary_kernel
from tritlm.kernels.pack_rows import (
    PackedBinary,
    PackedInt4,
    PackedInt8,
    concat_rows,
    pack_binary_kernel,
    pack_int4,
    pack_int8,
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
        ok = _PACKED[self.kind]
        if not isinstance(self.weights, ok) and not (self.kind == "ternary" and isinstance(self.weights, PackedBase3)):
            raise ValueError(f"{self.kind} weights must be a {ok.__name__}")
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
    def bits(self) -> float:
        if isinstance(self.weights, PackedBase3):
            return 1.6
        return {"ternary": 2, "binary": 1, "int8": 8, "int4": 4, "fp16": 16, "fp32": 32}[self.kind]

    def for_runtime(self) -> PackedLinear:
        """This layer in a layout the kernels read (base-3 storage unpacked to ``i2s_r4``)."""
        if isinstance(self.weights, PackedBase3):
            return PackedLinear("ternary", pack_ternary_kernel(self.levels()), self.scale)
        return self

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
        if isinstance(self.weights, PackedBase3):
            return self.for_runtime().kernel(threads, backend)
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
    parts = [p.for_runtime() for p in parts]
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


def pack_levels(q: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray, cfg: QuantConfig,
                ternary_layout: str = "i2s") -> PackedLinear:
    """Integer levels + scale from :func:`tritlm.quant.weights.quantize_weight` -> PackedLinear.

    ``ternary_layout``: ``i2s`` (2 bits, the kernels' layout) or ``base3`` (1.6 bits stored)."""
    q = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    q = q.astype(np.int8)
    s = scale.detach().cpu().float().numpy() if isinstance(scale, torch.Tensor) else np.asarray(scale, np.float32)
    n = q.shape[0]
    if cfg.weight == "ternary":
        if ternary_layout not in ("i2s", "base3"):
            raise ValueError(f"ternary_layout must be 'i2s' or 'base3', got {ternary_layout!r}")
        w = pack_base3_rows(q) if ternary_layout == "base3" else pack_ternary_kernel(q)
        return PackedLinear("ternary", w, s.reshape(-1) if s.size == n else s.reshape(1))
    if cfg.weight == "binary":
        return PackedLinear("binary", pack_binary_kernel(q), s.reshape(-1) if s.size == n else s.reshape(1))
    if cfg.weight == "int8":
        return PackedLinear("int8", pack_int8(q), s.reshape(n))
    if cfg.weight == "int4":
        return PackedLinear("int4", pack_int4(q, cfg.group_size), s.reshape(n, -1))
    raise ValueError(f"{cfg.weight} weights have no integer levels")


@torch.no_grad()
def pack_module(mod: torch.nn.Module, fp_dtype: str = "fp16", ternary_layout: str = "i2s") -> PackedLinear:
    """A trained Linear (BitLinear of any kind, or a plain ``nn.Linear``) -> its PackedLinear.

    FP layers keep their weight in ``fp_dtype`` (fp16 or fp32; bf16 is stored as fp32).
    """
    cfg = getattr(mod, "config", None)
    if cfg is not None and cfg.quantised:
        q, s = mod.quantized_weight()
        return pack_levels(q, s, cfg, ternary_layout)
    kind = "fp16" if fp_dtype == "fp16" else "fp32"
    return PackedLinear(kind, mod.weight.detach().to(_FP[kind]).contiguous().clone())


# --------------------------------------------------------------------------- runners
# A runner computes ``out = x @ W^T`` for 2-D float32 CPU tensors: ``runner(x [M, K], out [M, N])``.
class KernelLinear:
    """A (possibly fused) low-bit Linear run by a C kernel (any kind: one C context type with a kind
    tag, so the fused decode step can drive it too)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.n, self.k = kernel.n, kernel.k
        self._fast = kernel._ctx is not None
        if self._fast:  # hoisted: the ctypes entry point and context (see KERNELS.md, per-call cost)
            self._fn, self._ctx, self._threads = kernel._fwd, kernel._ctx, kernel.threads or 0

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self._fast:
            if self._fn(self._ctx, x.data_ptr(), x.shape[0], self.k, out.data_ptr(), self._threads):
                raise MemoryError("tritlm kernel: workspace allocation failed")
            return out
        return self.kernel(x, out=out)


class DenseLinear:
    """F.linear over a float weight (FP layers, and the dense PyTorch baseline), float32 or bfloat16."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.w = w.to(device=device, dtype=dtype).contiguous()
        self.n, self.k = w.shape
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dtype is torch.float32:
            return torch.mm(x, self.w.t(), out=out)
        out.copy_(torch.nn.functional.linear(x.to(self.dtype), self.w))
        return out


class F16Linear:
    """An fp16-stored layer read as fp16 by the C GEMV (float32 math, half the bytes of fp32)."""

    def __init__(self, w: torch.Tensor):
        from tritlm.kernels.cpu.f16 import F16MatMul

        self.mm = F16MatMul(w)
        self.n, self.k = w.shape

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.mm(x, out)


class SplitLinear:
    """Layers that share an input but not a kind (e.g. an int8 q_proj next to ternary k/v), run as
    one: each part writes its columns of the output. The fused decode step does not take these."""

    def __init__(self, parts: list):
        self.parts = parts
        self.n, self.k = sum(p.n for p in parts), parts[0].k

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        c = 0
        for p in self.parts:
            out[:, c:c + p.n] = p(x, torch.empty(x.shape[0], p.n, device=x.device))
            c += p.n
        return out


class TritPlaneHead:
    """A dense head approximated by 4 balanced-ternary digit planes, run by one ternary kernel.

    Per row r: code c = round(w / s_r) in [-40, 40] with s_r = max|w_r| / 40;
    c = d0 + 3 d1 + 9 d2 + 27 d3 (digits in {-1, 0, 1}); the planes are stacked along N with
    row scales s_r * 3^p, and the four partial outputs are summed (~6.3 bits of code, 8 bits read).
    """

    PLANES = 4

    def __init__(self, w: torch.Tensor, threads: int | None = None):
        from tritlm.kernels.cpu import TernaryLinearKernel

        w = w.float().numpy()
        v, d = w.shape
        top = (3 ** self.PLANES - 1) // 2
        s = np.abs(w).max(axis=1) / top
        s[s == 0] = 1.0
        c = np.rint(w / s[:, None]).astype(np.int32)
        planes, scales = [], []
        for p in range(self.PLANES):
            dig = ((c + 1) % 3) - 1  # balanced ternary digit
            c = (c - dig) // 3
            planes.append(dig.astype(np.int8))
            scales.append(s * 3.0 ** p)
        self.lin = KernelLinear(TernaryLinearKernel(pack_ternary_kernel(np.concatenate(planes)),
                                                    np.concatenate(scales).astype(np.float32), threads=threads))
        self.n, self.k, self.v = v, d, v

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        buf = torch.empty(m, self.PLANES * self.v)
        self.lin(x, buf)
        torch.sum(buf.view(m, self.PLANES, self.v), dim=1, out=out)
        return out


def int_head(w: torch.Tensor, kind: str, threads: int | None = None) -> KernelLinear:
    """A dense head quantised for the CPU kernels: ``q8`` (int8 per row, llama.cpp's Q8_0 size)
    or ``q4`` (int4 per 32 weights, Q4_0's); int8 activations per token, as every kernel here."""
    from tritlm.quant.weights import quantize_weight

    cfg = {"q8": QuantConfig(weight="int8"), "q4": QuantConfig(weight="int4", group_size=32)}[kind]
    q, s = quantize_weight(w.float(), cfg)
    return KernelLinear(pack_levels(q, s, cfg).kernel(threads))


class TritonLinear:
    """Ternary or binary layers (binary levels are ternary ones) as 2-bit ``t2_k4`` weights on the
    device, run by the Triton kernels (``kernels/triton/ternary_mm.py``): CUDA, or CPU tensors
    under ``TRITON_INTERPRET=1``."""

    def __init__(self, p: PackedLinear, device: torch.device | str):
        from tritlm.kernels.triton.layout import pack_t2

        self.packed = pack_t2(torch.from_numpy(p.levels())).to(device)
        self.scale = torch.from_numpy(np.ascontiguousarray(p.row_scales())).to(device)
        self.n, self.k = p.n, p.k

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        from tritlm.kernels.triton.ternary_mm import ternary_linear

        return ternary_linear(x, self.packed, self.scale, self.k, out)


BACKENDS = ("packed", "dense", "triton")


def runner_for(parts: list[PackedLinear], backend: str = "packed", dense_dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu"):
    """The runner of one or more layers that share an input (fused when they share a kind).

    ``packed``: the C kernels (CPU); ``dense``: F.linear over the dequantised weights in
    ``dense_dtype`` on ``device``; ``triton``: ternary / binary layers through the Triton kernels
    on ``device``, the other kinds as dense fp16 there (no GPU kernel of their own yet)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "dense":
        return DenseLinear(torch.cat([p.dequant() for p in parts]), dense_dtype, device)
    parts = [p.for_runtime() for p in parts]
    if backend == "triton":
        def one_gpu(p: PackedLinear):
            if p.kind in ("ternary", "binary"):
                return TritonLinear(p, device)
            return DenseLinear(p.dequant(), torch.float16 if torch.device(device).type == "cuda" else torch.float32,
                               device)
        groups = [concat_linears(parts)] if all(parts[0].fusable_with(p) for p in parts) else parts
        return one_gpu(groups[0]) if len(groups) == 1 else SplitLinear([one_gpu(p) for p in groups])

    def one(p: PackedLinear):
        if p.kind == "fp16":
            return F16Linear(p.weights)
        if p.kind == "fp32":
            return DenseLinear(p.weights, torch.float32)
        return KernelLinear(p.kernel())

    if all(parts[0].fusable_with(p) for p in parts):
        return one(concat_linears(parts))
    return SplitLinear([one(p) for p in parts])


class PackedLinearModule(torch.nn.Module):
    """A block Linear (or a row-fused group of them: q|k|v, gate|up) in its runtime kind; what
    ``convert_for_runtime`` swaps into the one Transformer forward.

    The backend seam: the runner of ``backend`` (``runner_for``) on ``device``; inputs on another
    device than the runner's go through the torch reference.
    """

    def __init__(self, parts: list[PackedLinear], backend: str = "packed", dense_dtype: torch.dtype = torch.float32,
                 input_norm: bool = False, buffers: dict | None = None, role: str | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.parts = parts
        # Output buffers shared by the modules of one role across layers (each output is consumed
        # before the next layer's module of that role runs): no fresh multi-MB allocation, and its
        # page faults, per call. Only without autograd, where nothing keeps the output alive.
        self._buffers_pool, self._role = buffers, role
        self.runner = runner_for(parts, backend, dense_dtype, self.device)
        self.in_features, self.out_features = parts[0].k, sum(p.n for p in parts)
        # BitLinear's parameter-free input RMSNorm (RMSNorm's default eps 1e-6), when configured
        self.input_norm = input_norm
        self.quantises_input = backend != "dense" and any(p.scale is not None for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm:
            x = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), None, 1e-6)
        if x.device.type != self.device.type:
            return torch.cat([p.reference(x) for p in self.parts], dim=-1)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype is not torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        out = self.runner(x2, self._out(x2.shape[0]))
        return out.view(*x.shape[:-1], self.out_features)

    def _out(self, m: int) -> torch.Tensor:
        pool = self._buffers_pool
        if pool is None or torch.is_grad_enabled():
            return torch.empty(m, self.out_features, device=self.device)
        key = (self._role, m, self.out_features)
        b = pool.get(key)
        if b is None:
            if len(pool) > 64:  # many distinct M (prefill lengths): do not grow forever
                pool.clear()
            b = pool[key] = torch.empty(m, self.out_features, device=self.device)
        return b

    def extra_repr(self) -> str:
        kinds = "|".join(p.kind for p in self.parts)
        return f"in={self.in_features}, out={self.out_features}, kind={kinds}"
