"""Python face of the CPU kernels: :class:`TernaryLinearKernel`, the shared base class of every
packed-weight kernel object (:class:`LinearKernelBase`; int8 / int4 / binary in :mod:`.lowbit`),
the settings of the thread pool and the parameter tuning loop (:func:`tune`).

Backends (picked per kernel object; ``backend=`` argument, else ``$TRITLM_KERNEL``, else "auto"):

* ``"amx"``      - the compiled C library, AMX-INT8 tiles for ternary calls of 4+ tokens (weights
  as A: batched decode and short prompts; from ``amx_min_m`` on, 96 tokens at K <= 1536 and 33
  above: activations as A, longer prompts); 1-3
  tokens and the other kinds as ``"avx512"`` (CPUs with AMX-TILE / AMX-INT8,
  an OS that enables the tile state and, on Linux, grants it to the process);
* ``"avx512"``   - the compiled C library, AVX-512 VNNI ``vpdpbusd`` routes for every weight kind
  (CPUs with AVX512 F/BW/VL/VNNI and an OS that saves the ZMM state); the quantiser, the fused
  step's attention and the fp16 head use the AVX2 code there;
* ``"avx2"``     - the compiled C library, AVX2 ``maddubs`` route (x86-64 with AVX2 + FMA);
* ``"portable"`` - the compiled C library, plain C loops (any CPU);
* ``"numpy"``    - pure numpy (exact, slow, ~4 bytes of RAM per weight), used with a logged warning
  when the C library cannot be built;
* ``"auto"``     - amx if the CPU has it, else avx512, else avx2, else portable, else numpy (CPUID at run
  time: one library runs on every x86-64 and never executes an instruction the CPU lacks).

Per-call overhead is kept to a few microseconds: the C context (weight pointer, scales, int8
activation workspace) is built once per weight matrix, pointers of the inputs are read with the
cheapest route (``Tensor.data_ptr()``, ``ctypes.c_char.from_buffer``), and the activation
quantiser runs inside the same C call as the matmul.
"""

from __future__ import annotations

import ctypes
import logging
import weakref

import numpy as np

from .. import autotune
from ..pack import PackedTernary, pack_ternary_kernel
from ..reference import quantize_act_ref
from . import build
from .routes import (  # noqa: F401  (re-exported: the package's and the tests' names)
    AVX2_BACKENDS,
    BACKENDS,
    BUCKETS,
    DEFAULT_PARAMS,
    ISA_CODES,
    ISA_NAMES,
    VNNI_DEFAULT_PARAMS,
    get_num_threads,
    kernel_info,
    m_bucket,
    resolve_backend,
    set_min_chunk_blocks,
    set_num_threads,
    set_spin_us,
)

log = logging.getLogger("tritlm.kernels")


# --------------------------------------------------------------------------- helpers
def _ptr(a: np.ndarray) -> int:
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):  # read-only or 0-size buffer
        return a.ctypes.data


def _aligned_copy(a: np.ndarray, align: int = 64) -> np.ndarray:
    raw = np.empty(a.nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    out = raw[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


_F32_NP = np.dtype(np.float32)
_TORCH = None


def _torch():
    global _TORCH
    if _TORCH is None:
        import torch

        _TORCH = torch
    return _TORCH


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def quantize_act(x, backend: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8 quantisation (same numbers as :func:`quantize_act_ref`), in C."""
    if _is_torch(x):
        x = x.detach().cpu().float().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"activations must be 2-D [M, K], got shape {x.shape}")
    be = resolve_backend(backend)
    if be == "numpy":
        return quantize_act_ref(x)
    m, k = x.shape
    q = np.empty((m, k), dtype=np.int8)
    s = np.empty(m, dtype=np.float32)
    if m and k:
        build.load_library().tt_quantize(_ptr(x), m, k, k, _ptr(q), k, k, _ptr(s), None, int(be in AVX2_BACKENDS))
    return q, s


def _vector(v, n: int, name: str) -> np.ndarray:
    """float32 ``[n]`` from a scalar (broadcast) or an ``n``-vector (numpy or torch)."""
    a = np.asarray(v.detach().cpu().numpy() if _is_torch(v) else v, dtype=np.float32).reshape(-1)
    if a.size == 1:
        a = np.full(n, a[0], dtype=np.float32)
    if a.size != n:
        raise ValueError(f"{name} must be a scalar or have N = {n} entries, got {a.size}")
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------- the kernel objects
class LinearKernelBase:
    """What every packed-weight CPU kernel object shares (ternary here; int8 / int4 / binary in
    :mod:`.lowbit`): the calling convention, the int8 entry point, thread / backend / parameter
    handling, tuning and the numpy fallback. A subclass sets ``n``, ``k``, ``k_padded``,
    ``packed`` and its scales, calls :meth:`_init_common`, then (unless the backend is "numpy")
    creates its C context and hands it to :meth:`_attach`; it implements :meth:`_numpy_out`
    (and :meth:`_numpy_levels` when its integer dots are exact).
    """

    kind = "ternary"      # part of the autotune cache key
    exact_int = True      # plain integer dots (int_dots) exist
    _max_level = 1        # max |weight level|: picks an exact float dtype for the numpy dots

    n: int
    k: int
    k_padded: int

    def _ctor_args(self) -> tuple:
        """The leading constructor arguments that rebuild this kernel (weights and scales)."""
        raise NotImplementedError

    def __reduce__(self):
        """Pickle / deepcopy rebuild the C context from the packed weights (never copy pointers)."""
        return (_rebuild, (type(self), self._ctor_args(), self.bias, self.threads, self.backend,
                           {b: dict(p) for b, p in self.params.items()}))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.n}, k={self.k}, backend={self.backend!r}, "
                f"threads={self.threads})")

    def _init_common(self, bias, threads, backend) -> None:
        if bias is not None:
            b = np.asarray(bias.detach().cpu().numpy() if _is_torch(bias) else bias, dtype=np.float32)
            b = np.ascontiguousarray(b.reshape(-1))
            if b.size != self.n:
                raise ValueError(f"bias must have N = {self.n} entries, got {b.size}")
            bias = b
        self.bias = bias
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = None if threads is None else int(threads)
        self.backend = resolve_backend(backend)
        self._ctx = None
        self._dense = None
        self.params = {b: dict(DEFAULT_PARAMS) for b in range(len(BUCKETS))}

    def _attach(self, ctx, params: dict | None) -> None:
        """Own the C context ``ctx`` (freed with the object), select the ISA, apply parameters."""
        lib = self._lib
        if not ctx:
            raise MemoryError(f"{type(self).__name__}: creating the C context failed")
        self._ctx = ctx
        self._finalizer = weakref.finalize(self, lib.tt_ctx_free, ctx)
        # the route that runs: AMX is ternary-only (the other kinds take VNNI), an int8 context
        # without its row sums takes AVX2
        self.backend = ISA_NAMES[lib.tt_ctx_set_isa(ctx, ISA_CODES[self.backend])]
        if self.backend in ("avx512", "amx"):
            self.params = {b: dict(VNNI_DEFAULT_PARAMS) for b in range(len(BUCKETS))}
        self._fwd = lib.tt_forward_f32
        self._fwd_i8 = lib.tt_forward_i8
        if params is None:
            try:
                params = autotune.lookup(self.n, self.k, self.effective_threads, self.backend, kind=self.kind)
            except Exception as e:  # noqa: BLE001 - a broken cache must not break inference
                log.warning("tritlm: ignoring the autotune cache (%s)", e)
                params = None
        self.set_params(params or {})

    # ---------------------------------------------------------------- weight placement
    @property
    def weight_nbytes(self) -> int:
        """Bytes of the packed weights the C context reads (0 without a context: nothing to move)."""
        return self._data.nbytes if self._ctx is not None else 0

    @property
    def weight_ptr(self) -> int:
        return _ptr(self._data) if self._ctx is not None else 0

    def move_weights(self, dest) -> None:
        """Copy the packed weights into ``dest`` (a 64-byte aligned uint8 tensor or array of
        :attr:`weight_nbytes`, e.g. a piece of a huge-page :class:`~tritlm.hugepages.Arena`) and
        read them from there from now on."""
        if self._ctx is None:
            return
        dest = dest.numpy() if _is_torch(dest) else dest
        if dest.dtype != np.uint8 or dest.nbytes != self._data.nbytes or _ptr(dest) % 64:
            raise ValueError(f"move_weights needs {self._data.nbytes} 64-byte aligned bytes, got {dest.nbytes} "
                             f"at offset {_ptr(dest) % 64} from a cache line")
        view = dest.view(self._data.dtype).reshape(self._data.shape)
        view[...] = self._data
        self._lib.tt_ctx_set_weights(self._ctx, _ptr(view))
        self._data = view

    # ---------------------------------------------------------------- configuration
    @property
    def effective_threads(self) -> int:
        return self.threads or get_num_threads()

    def set_params(self, params: dict) -> None:
        """``{bucket (0/1/2 or "1"/"2-15"/"16+"): {"prefetch": bytes, "panel_rows": rows, "chunks": n}}``.

        prefetch: software-prefetch distance of the GEMV weight stream (0 = none; ternary only);
        panel_rows: rows per GEMM panel (multiple of 4); chunks: GEMV chunks per thread (dynamic
        balancing); nta: 1 = non-temporal prefetch hint (weights are read once per call), 0 =
        prefetch into all levels.
        """
        for key, p in params.items():
            b = BUCKETS.index(key) if isinstance(key, str) else int(key)
            cur = dict(self.params[b])
            cur.update({k: int(v) for k, v in p.items() if k in DEFAULT_PARAMS})
            self.params[b] = cur
        if self._ctx is not None:
            for b, p in self.params.items():
                self._lib.tt_ctx_set_params(self._ctx, b, p["prefetch"], p["panel_rows"], p["chunks"], p["nta"])

    def tune(self, ms=(1, 128), threads: int | None = None, save: bool = True, *,
             candidates: dict | None = None, repeats: int = 5, flush_bytes: int = 64 << 20,
             seed: int = 0) -> dict:
        """Time the parameter candidates on this kernel for each batch size in ``ms``; returns
        ``{bucket: best params}``, applies them and (``save``) stores them in ``autotune.json``.

        For decode (M = 1) the caches are flushed before each timed call so the weights come from
        DRAM, as in a real model; the median of ``repeats`` calls is compared.
        """
        from .tuning import tune_kernel

        return tune_kernel(self, ms, threads, save, candidates=candidates, repeats=repeats,
                           flush_bytes=flush_bytes, seed=seed)

    # ---------------------------------------------------------------- calls
    def __call__(self, x, out=None):
        """float ``[..., K]`` (numpy or torch) -> float32 ``[..., N]`` of the same kind.

        ``out``: optional preallocated C-contiguous float32 result (same kind as ``x``).
        """
        if type(x) is np.ndarray:
            return self._call_numpy(x, out)
        if _is_torch(x):
            return self._call_torch(x, out)
        return self._call_numpy(np.asarray(x), out)

    def _check_out(self, out, shape, m):
        if tuple(out.shape) != tuple(shape[:-1]) + (self.n,):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape[:-1]) + (self.n,)}")
        if _is_torch(out):
            torch = _torch()
            if out.dtype is not torch.float32 or not out.is_cpu or not out.is_contiguous():
                raise ValueError("out must be a contiguous float32 CPU tensor")
        elif out.dtype != _F32_NP or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous float32 array")

    def _call_numpy(self, x: np.ndarray, out=None) -> np.ndarray:
        shape = x.shape
        k = self.k
        if not shape or shape[-1] != k:
            raise ValueError(f"expected activations [..., {k}], got shape {shape}")
        if x.dtype != _F32_NP or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        m = shape[0] if len(shape) == 2 else x.size // k
        if out is None:
            out = np.empty(shape[:-1] + (self.n,), dtype=_F32_NP)
        else:
            self._check_out(out, shape, m)
        if m == 0:
            return out
        if self._ctx is None:
            out.reshape(m, self.n)[...] = self._numpy_forward(x.reshape(m, k))  # reshape: a view
            return out
        if self._fwd(self._ctx, _ptr(x), m, k, _ptr(out), self.threads or 0):
            raise MemoryError("tritlm kernel: workspace allocation failed")
        return out

    def _call_torch(self, x, out=None):
        torch = _torch()
        f32 = torch.float32
        shape = x.shape
        k = self.k
        if not shape or shape[-1] != k:
            raise ValueError(f"expected activations [..., {k}], got shape {tuple(shape)}")
        if not (x.dtype is f32 and x.is_cpu and x.is_contiguous()):
            x = x.detach().to("cpu", f32).contiguous()
        m = shape[0] if len(shape) == 2 else x.numel() // k
        if out is None:
            out = torch.empty(*shape[:-1], self.n, dtype=f32)
        else:
            self._check_out(out, shape, m)
        if m == 0:
            return out
        if self._ctx is None:
            res = self._numpy_forward(x.detach().reshape(m, k).numpy())
            out.view(m, self.n).copy_(torch.from_numpy(res))
            return out
        if self._fwd(self._ctx, x.data_ptr(), m, k, out.data_ptr(), self.threads or 0):
            raise MemoryError("tritlm kernel: workspace allocation failed")
        return out

    def _check_int8(self, xq, x_scale=None):
        if _is_torch(xq):
            xq = xq.detach().cpu().numpy()
        xq = np.asarray(xq)
        if xq.ndim != 2 or xq.shape[1] != self.k:
            raise ValueError(f"xq must be int8 [M, {self.k}], got shape {xq.shape}")
        if xq.dtype != np.int8:
            raise ValueError(f"xq must have dtype int8, got {xq.dtype}")
        if not xq.flags.c_contiguous:
            xq = np.ascontiguousarray(xq)
        if x_scale is not None:
            if _is_torch(x_scale):
                x_scale = x_scale.detach().cpu().numpy()
            x_scale = np.ascontiguousarray(x_scale, dtype=np.float32).reshape(-1)
            if x_scale.size != xq.shape[0]:
                raise ValueError(f"x_scale must have M = {xq.shape[0]} entries, got {x_scale.size}")
        return xq, x_scale

    def matmul_int8(self, xq, x_scale, out: np.ndarray | None = None) -> np.ndarray:
        """Low-level path: int8 ``[M, K]`` activations with per-token scales ``[M]`` (x ~= xq / s).

        Writes ``(xq @ wq^T) * w_scale * (1 / x_scale[:, None]) (+ bias)`` (for int4: the group-scaled
        sum) into ``out`` (float32 ``[M, N]``, C-contiguous, preallocated by the caller for zero
        allocation) and returns it.
        """
        xq, x_scale = self._check_int8(xq, x_scale)
        m = xq.shape[0]
        if out is None:
            out = np.empty((m, self.n), dtype=np.float32)
        elif out.shape != (m, self.n) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape {(m, self.n)}")
        if m == 0:
            return out
        if self._ctx is None:
            res = self._numpy_out(xq, x_scale)
            out[...] = res.astype(np.float32) + (self.bias if self.bias is not None else np.float32(0))
            return out
        if self._fwd_i8(self._ctx, _ptr(xq), m, self.k, _ptr(x_scale), _ptr(out), None, self.threads or 0):
            raise MemoryError("tritlm kernel: workspace allocation failed")
        return out

    def int_dots(self, xq) -> np.ndarray:
        """Exact integer dot products ``xq @ wq^T`` as int32 ``[M, N]`` (for tests / debugging)."""
        if not self.exact_int:
            raise ValueError(f"{type(self).__name__}: no single integer dot per row (group scales)")
        xq, _ = self._check_int8(xq)
        m = xq.shape[0]
        dots = np.empty((m, self.n), dtype=np.int32)
        if m == 0:
            return dots
        if self._ctx is None:
            return self._numpy_dots(xq).astype(np.int32)
        if self._fwd_i8(self._ctx, _ptr(xq), m, self.k, None, None, _ptr(dots), self.threads or 0):
            raise MemoryError("tritlm kernel: workspace allocation failed")
        return dots

    # ---------------------------------------------------------------- numpy fallback
    def _numpy_levels(self) -> np.ndarray:
        """int8 ``[N, K]`` weight levels (for the numpy fallback)."""
        return self.packed.unpack()

    def _numpy_dots(self, xq: np.ndarray) -> np.ndarray:
        if self._dense is None:  # float32 is exact for |dot| < 2^24
            dt = np.float32 if self.k * 128 * self._max_level < (1 << 24) else np.float64
            self._dense = np.ascontiguousarray(self._numpy_levels().T.astype(dt))
        return np.rint(xq.astype(self._dense.dtype) @ self._dense).astype(np.int64)

    def _numpy_out(self, xq: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """float64 ``[M, N]`` results before the bias: dots * per-row scale * (1 / x_scale), the C
        epilogue's operations."""
        dots = self._numpy_dots(xq).astype(np.float64)
        return dots * self.w_scale.astype(np.float64) * (1.0 / xs.astype(np.float64))[:, None]

    def _numpy_forward(self, x: np.ndarray) -> np.ndarray:
        xq, xs = quantize_act_ref(x)
        res = self._numpy_out(xq, xs).astype(np.float32)
        if self.bias is not None:
            res += self.bias
        return res


class TernaryLinearKernel(LinearKernelBase):
    """``y = x @ W^T * w_scale (+ bias)`` for ternary ``W`` with int8 per-token activations.

    Built once per weight matrix (packs, aligns, creates the C context); then
    ``kernel(x)`` quantises ``x`` (float, ``[..., K]``, numpy or torch) per token and returns
    float32 ``[..., N]`` of the same kind. Inference only: no autograd.

    Args:
        weight: int8-like ``[N, K]`` with values in {-1, 0, 1}, or a :class:`PackedTernary`.
        w_scale: scalar (per tensor) or ``[N]`` (per output row); multiplies: W ~= wq * w_scale.
        bias: optional ``[N]``.
        threads: threads for this kernel (None: the global :func:`set_num_threads` value).
        backend: "auto" | "amx" | "avx512" | "avx2" | "portable" | "numpy" (None: ``$TRITLM_KERNEL``
            or auto).
        params: ``{bucket: {"prefetch": bytes, "panel_rows": rows}}`` overrides; by default the
            autotune cache (``autotune.json``) is consulted, then built-in defaults.
    """

    def __init__(self, weight, w_scale=1.0, bias=None, *, threads: int | None = None,
                 backend: str | None = None, params: dict | None = None):
        if isinstance(weight, PackedTernary):
            packed = weight if weight.layout == "i2s_r4" else pack_ternary_kernel(weight.unpack())
        else:
            packed = pack_ternary_kernel(weight)
        self.packed = packed
        self.n, self.k, self.k_padded = packed.n, packed.k, packed.k_padded
        if self.k > (1 << 22):
            raise ValueError(f"K = {self.k} too large for int32 accumulation (max {1 << 22})")
        self.w_scale = _vector(w_scale, self.n, "w_scale")
        self._init_common(bias, threads, backend)
        if self.backend == "numpy":
            return
        self._lib = lib = build.load_library()
        self._data = _aligned_copy(packed.data)
        self._attach(lib.tt_ctx_new(_ptr(self._data), self.n, self.k, self.k_padded, _ptr(self.w_scale),
                                    _ptr(self.bias) if self.bias is not None else None), params)

    def set_amx_min_m(self, m: int, few_min_m: int | None = None) -> None:
        """Token counts of the two AMX routes: calls of at least ``m`` tokens take the
        activations-as-A tiles; ``few_min_m`` .. ``m - 1`` tokens (default 4) the weights-as-A
        tiles; a single token the VNNI GEMV, 2-3 tokens below ``few_min_m`` its few-token form,
        4 .. ``few_min_m - 1`` the VNNI GEMM."""
        if int(m) < 1:
            raise ValueError(f"amx_min_m must be >= 1, got {m}")
        if few_min_m is not None and int(few_min_m) < 2:
            raise ValueError(f"few_min_m must be >= 2, got {few_min_m}")
        if self._ctx is not None:
            self._lib.tt_ctx_set_amx_min_m(self._ctx, int(m))
            if few_min_m is not None:
                self._lib.tt_ctx_set_amxs_min_m(self._ctx, int(few_min_m))

    def _ctor_args(self) -> tuple:
        return (self.packed, self.w_scale)


def _rebuild(cls, args, bias, threads, backend, params):
    try:
        be = resolve_backend(backend)
    except ValueError:
        be = None
    return cls(*args, bias=bias, threads=threads, backend=be, params=params)
