"""The packed CPU runtime: a torch forward where every low-bit Linear is a C kernel call.

Design choices (each measured on 2-core Zen3 boxes, see benchmarks/RESULTS.md "CPU runtime"):

* Every block Linear has its own kind (ternary, binary, int8, int4, fp16 / fp32; see
  ``nn/packed_linear.py``). q/k/v and gate/up share their input, so when a group shares one
  quantised kind it is *one* kernel over the row-concatenated packed weights (per-row scales): 4
  kernel calls per layer instead of 7, which halves the per-call overhead and gives the thread
  pool bigger chunks. A group of mixed kinds runs part by part (:class:`SplitLinear`).
* The kernel's C entry point is called directly with ``data_ptr()`` of preallocated buffers: no
  per-call validation or allocation on the decode path.
* The KV cache is preallocated ``[slots, kv_heads, max_len, head_dim]`` per layer; a slot is one
  sequence. Decode of several sequences (batching) is one forward with M = number of sequences.
* The LM head is exact by default: the stored fp16 matrix read as fp16 by a C GEMV
  (``kernels/cpu/f16.py``: half the bytes of a float32 BLAS call), or a float32 matmul when the
  model stores it in float32. ``head="t4"`` stores it as four balanced-ternary digit planes (an
  int8-like per-row code in [-40, 40], ~6.3 bits, like the Q6_K output tensor of llama.cpp) run
  by the same ternary kernel, which reads 8 bits per weight (approximate logits, ~3% max error).
* ``backend="dense"`` gives the dense PyTorch baseline (F.linear over the dequantised weights,
  float32 or bfloat16) through the same code, for ``tritlm bench``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tritlm.formats.packed import PackedModel
from tritlm.infer.fused_decode import FusedDecoder
from tritlm.infer.sampling import Sampler, SamplingParams, contrastive_select, sample
from tritlm.kernels.cpu import TernaryLinearKernel, set_num_threads
from tritlm.kernels.cpu.f16 import F16MatMul
from tritlm.kernels.pack import pack_ternary_kernel
from tritlm.model.transformer import rope_tables
from tritlm.nn.packed_linear import PackedLinear, concat_linears

log = logging.getLogger(__name__)

HEADS = ("auto", "f16", "fp32", "t4")


# --------------------------------------------------------------------------- linears
class KernelLinear:
    """A (possibly fused) low-bit Linear run by a C kernel; ``__call__(x, out)`` with 2-D float32.

    ``kernel``: a ``TernaryLinearKernel`` / ``Int8LinearKernel`` / ``Int4LinearKernel`` /
    ``BinaryLinearKernel`` (one C context type with a kind tag: the fused decode step runs any).
    """

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


class F16Linear:
    """An fp16-stored FP layer read as fp16 by the C GEMV (exact float32 math)."""

    def __init__(self, w: torch.Tensor):
        self.mm = F16MatMul(w)
        self.n, self.k = w.shape

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.mm(x, out)


class SplitLinear:
    """Layers that share an input but not a kind (e.g. an int8 q_proj next to ternary k/v): each
    part runs its own kernel into its columns of the output. No fused decode for these."""

    def __init__(self, parts: list):
        self.parts = parts
        self.n, self.k = sum(p.n for p in parts), parts[0].k
        self._bufs: dict[int, list[torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        bufs = self._bufs.get(m)
        if bufs is None:
            if len(self._bufs) > 16:
                self._bufs.clear()
            bufs = self._bufs[m] = [torch.empty(m, p.n) for p in self.parts]
        c = 0
        for p, b in zip(self.parts, bufs):
            out[:, c:c + p.n] = p(x, b)
            c += p.n
        return out


class DenseLinear:
    """F.linear over the dequantised weights (the dense PyTorch baseline), float32 or bfloat16."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.w = w.to(dtype).contiguous()
        self.n, self.k = w.shape
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dtype is torch.float32:
            return torch.mm(x, self.w.t(), out=out)
        out.copy_(F.linear(x.to(self.dtype), self.w))
        return out


class TritPlaneHead:
    """Dense head approximated by 4 balanced-ternary digit planes, run by one ternary kernel.

    Per row r: code c = round(w / s_r) in [-40, 40] with s_r = max|w_r| / 40;
    c = d0 + 3 d1 + 9 d2 + 27 d3 (digits in {-1, 0, 1}); the planes are stacked along N with
    row scales s_r * 3^p, and the four partial outputs are summed.
    """

    PLANES = 4

    def __init__(self, w: torch.Tensor, threads: int | None = None):
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
        self._buf: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if self._buf is None or self._buf.shape[0] < m:
            self._buf = torch.empty(m, self.PLANES * self.v)
        buf = self._buf[:m]
        self.lin(x, buf)
        torch.sum(buf.view(m, self.PLANES, self.v), dim=1, out=out)
        return out


# --------------------------------------------------------------------------- engine
@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: object
    o: object
    gu: object
    down: object
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    attn_sub: torch.Tensor | None = None
    ffn_sub: torch.Tensor | None = None


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    native_s: float = 0.0  # of decode_s: inside the fused C step and the LM head (the rest is Python)


class Engine:
    """Prefill + decode over a :class:`PackedModel` with a preallocated KV cache.

    Args:
        pm: the packed model.
        threads: kernel threads (None: the kernels' global default).
        backend: "packed" (ternary kernels) or "dense" (F.linear baseline).
        dense_dtype: float32 or bfloat16 for ``backend="dense"``.
        head: "auto" (exact: "f16" when the model stores its head in fp16, else "fp32"), "f16"
            (fp16 weights, C GEMV), "fp32" (float32 matmul) or "t4" (4 ternary digit planes,
            approximate, 8 bits per weight).
        slots: how many sequences the KV cache holds (batch size).
        max_len: cache length (default: the model's context).
        torch_threads: intra-op threads of torch while the engine runs (None: leave as is); 1
            keeps torch's OpenMP workers from spinning against the kernel threads on small ops.
        fused: decode single tokens with one C call for all layers (``infer/fused_decode.py``)
            when the compiled kernels are available; False keeps every step on the torch path.
    """

    def __init__(self, pm: PackedModel, *, threads: int | None = None, backend: str = "packed",
                 dense_dtype: torch.dtype = torch.float32, head: str = "auto", slots: int = 1,
                 max_len: int | None = None, torch_threads: int | None = 1, fused: bool = True):
        if backend not in ("packed", "dense"):
            raise ValueError(f"backend must be 'packed' or 'dense', got {backend!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.pm = pm
        self.cfg = c = pm.config
        self.backend = backend
        self.threads = threads
        self.torch_threads = torch_threads
        if threads is not None:
            set_num_threads(threads)
        self.tokenizer = pm.tokenizer
        fp = pm.fp
        self.eps = c.norm_eps
        self.input_norm = c.quant.input_norm
        self.embed = fp["embed_tokens.weight"]
        self.final_norm = fp["norm.weight"].float()
        head_w = fp["embed_tokens.weight"] if c.tie_embeddings else fp["lm_head.weight"]
        if head == "auto":
            head = "f16" if head_w.dtype is torch.float16 else "fp32"
        self.head_kind = head
        if backend == "dense":
            self.head = DenseLinear(head_w.float(), dense_dtype)
        elif head == "t4":
            self.head = TritPlaneHead(head_w)
        elif head == "f16":
            self.head = F16MatMul(head_w)
        else:
            self.head = DenseLinear(head_w.float(), torch.float32)

        def one(p: PackedLinear):
            if p.kind == "fp16":
                return F16Linear(p.weights)
            if p.kind == "fp32":
                return DenseLinear(p.weights, torch.float32)
            return KernelLinear(p.kernel())

        def lin(names: list[str]):
            parts = [pm.linears[n] for n in names]
            if backend == "dense":
                return DenseLinear(torch.cat([p.dequant() for p in parts]), dense_dtype)
            if all(parts[0].fusable_with(p) for p in parts):
                return one(concat_linears(parts))
            return SplitLinear([one(p) for p in parts])

        def opt(name: str) -> torch.Tensor | None:
            t = fp.get(name)
            return None if t is None else t.float()

        self.layers: list[_Layer] = []
        for i in range(c.n_layers):
            a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
            self.layers.append(_Layer(
                ln1=fp[f"layers.{i}.input_layernorm.weight"].float(),
                ln2=fp[f"layers.{i}.post_attention_layernorm.weight"].float(),
                qkv=lin([a + "q_proj", a + "k_proj", a + "v_proj"]), o=lin([a + "o_proj"]),
                gu=lin([m + "gate_proj", m + "up_proj"]), down=lin([m + "down_proj"]),
                q_norm=opt(a + "q_norm.weight"), k_norm=opt(a + "k_norm.weight"),
                attn_sub=opt(a + "attn_sub_norm.weight"), ffn_sub=opt(m + "ffn_sub_norm.weight")))
        self.H, self.KV, self.hd = c.n_heads, c.kv_heads, c.head_dim
        self.max_len = max_len or c.max_seq_len
        cos, sin = rope_tables(self.hd, self.max_len, c.rope_theta)
        half = self.hd // 2
        self.cos = cos
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated): one op less.
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=1)
        self.slots = slots
        shape = (slots, self.KV, self.max_len, self.hd)
        self.k_cache = [torch.zeros(shape) for _ in range(c.n_layers)]
        self.v_cache = [torch.zeros(shape) for _ in range(c.n_layers)]
        self.pos = [0] * slots  # filled positions per slot
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # what each slot's cache holds
        self.stats = EngineStats()
        self._bufs: dict[tuple, torch.Tensor] = {}
        self.tracer: Callable[[str, int, torch.Tensor], None] | None = None  # see infer.profile
        self.timer: Callable[[str], contextlib.AbstractContextManager] | None = None
        # One cache, one caller at a time: servers share a LoadedModel across request threads.
        self.lock = threading.RLock()
        self.fused = FusedDecoder.create(self) if fused and backend == "packed" else None
        self._step_x = torch.empty(c.dim)
        self._step_h = torch.empty(1, c.dim)

    # ---------------------------------------------------------------- helpers
    def _buf(self, name: str, m: int, n: int) -> torch.Tensor:
        """A reusable output buffer (the kernels write into it; no allocation per token)."""
        key = (name, m)
        b = self._bufs.get(key)
        if b is None:
            if len(self._bufs) > 64:  # many distinct M (prefill lengths): do not grow forever
                self._bufs.clear()
            b = self._bufs[key] = torch.empty(m, n)
        return b

    def _norm(self, x: torch.Tensor, w: torch.Tensor | None, eps: float | None = None) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps if eps is None else eps)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        # BitLinear's parameter-free input RMSNorm (eps 1e-6, RMSNorm's default), when configured.
        return F.rms_norm(x, (x.shape[-1],), None, 1e-6) if self.input_norm else x

    def _trace(self, name: str, layer: int, t: torch.Tensor) -> None:
        if self.tracer is not None:
            self.tracer(name, layer, t)

    @contextlib.contextmanager
    def _torch_threads(self):
        if self.torch_threads is None or torch.get_num_threads() == self.torch_threads:
            yield
            return
        old = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _timed(self, name: str):
        return self.timer(name) if self.timer is not None else contextlib.nullcontext()

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, attend, want: str) -> torch.Tensor:
        """Shared layer stack. ``ids``/``pos``: [M]; ``attend(layer, q, k, v) -> [M, H*hd]``.

        ``want``: "all" (logits of every row), "last" (last row) or "rows" (every row; batch decode).
        """
        c = self.cfg
        m = ids.shape[0]
        x = self.embed[ids].float()
        self._trace("embed", -1, x)
        cos, ssin = self.cos[pos].unsqueeze(1), self.sin_signed[pos].unsqueeze(1)
        H, KV, hd = self.H, self.KV, self.hd
        nq, nkv = H * hd, KV * hd
        half = hd // 2
        rs = c.residual_scale
        relu2 = c.mlp == "relu2"
        for i, L in enumerate(self.layers):
            with self._timed(f"layer{i}.attn"):
                h = self._in(self._norm(x, L.ln1))
                qkv = L.qkv(h, self._buf("qkv", m, nq + 2 * nkv))
                qk = qkv[:, :nq + nkv].view(m, H + KV, hd)
                if L.q_norm is not None:
                    qk = torch.cat([self._norm(qk[:, :H], L.q_norm), self._norm(qk[:, H:], L.k_norm)], 1)
                qk = torch.addcmul(qk * cos, qk.roll(half, -1), ssin)  # RoPE on q and k at once
                v = qkv[:, nq + nkv:].view(m, KV, hd)
                y = attend(i, qk[:, :H], qk[:, H:], v)
                if L.attn_sub is not None:
                    y = self._norm(y, L.attn_sub)
                o = L.o(self._in(y), self._buf("o", m, c.dim))
                x.add_(o, alpha=rs) if rs != 1.0 else x.add_(o)
                self._trace("attn_out", i, o)
            with self._timed(f"layer{i}.mlp"):
                h = self._in(self._norm(x, L.ln2))
                gu = L.gu(h, self._buf("gu", m, 2 * c.ffn_dim))
                g = gu[:, :c.ffn_dim]
                g = F.relu(g).square_() if relu2 else F.silu(g)
                g.mul_(gu[:, c.ffn_dim:])
                if L.ffn_sub is not None:
                    g = self._norm(g, L.ffn_sub)
                d = L.down(self._in(g), self._buf("down", m, c.dim))
                x.add_(d, alpha=rs) if rs != 1.0 else x.add_(d)
                self._trace("mlp_out", i, d)
                self._trace("resid", i, x)
        with self._timed("head"):
            if want == "last":
                x = x[-1:]
            x = self._norm(x, self.final_norm).contiguous()
            self.last_hidden = x  # [rows, D]: contrastive search and tracers read it
            logits = self.head(x, torch.empty(x.shape[0], c.vocab_size))
        self._trace("logits", c.n_layers, logits)
        return logits

    def _fused_step(self, tok: int, slot: int, pos: int) -> torch.Tensor:
        """One token through the C decode step (same math as :meth:`_forward`); logits [1, V]."""
        x = self._step_x
        x.copy_(self.embed[tok])
        t = time.perf_counter()
        self.fused.step(x, slot, pos, self._step_h, self.threads or 0)
        out = self.head(self._step_h, torch.empty(1, self.cfg.vocab_size))
        self.stats.native_s += time.perf_counter() - t
        self.last_hidden = self._step_h.clone()
        return out

    def _check_room(self, slot: int, start: int, t: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range (engine has {self.slots})")
        if start + t > self.max_len:
            raise ValueError(f"{start + t} positions exceed the cache length {self.max_len}")

    @torch.no_grad()
    def forward_seq(self, ids: Sequence[int], slot: int = 0, start: int | None = None,
                    all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` for one sequence at positions ``start..`` (default: the slot's fill level).

        Writes their keys/values into the slot's cache and sets its fill level to the end.
        Returns logits ``[T, V]`` (``all_logits``) or ``[1, V]`` (the last position).
        """
        t = len(ids)
        if t == 0:
            raise ValueError("ids must not be empty")
        start = self.pos[slot] if start is None else start
        self._check_room(slot, start, t)
        end = start + t
        kc, vc = self.k_cache, self.v_cache
        rep = self.H // self.KV

        def attend(i, q, k, v):
            kc[i][slot, :, start:end] = k.transpose(0, 1)
            vc[i][slot, :, start:end] = v.transpose(0, 1)
            kk, vv = kc[i][slot:slot + 1, :, :end], vc[i][slot:slot + 1, :, :end]
            qq = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, hd]
            if t == 1:
                y = F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=rep > 1)
            elif start == 0:
                y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=rep > 1)
            else:  # new tokens see the cache plus the causal part of themselves
                mask = torch.ones(t, end, dtype=torch.bool).tril(diagonal=start)
                y = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=rep > 1)
            return y[0].transpose(0, 1).reshape(t, -1)

        t0 = time.perf_counter()
        with self._torch_threads():
            if t == 1 and self.fused is not None and self.tracer is None and self.timer is None:
                out = self._fused_step(int(ids[0]), slot, start)
            else:
                out = self._forward(torch.as_tensor(list(ids), dtype=torch.long),
                                    torch.arange(start, end), attend, "all" if all_logits else "last")
        dt = time.perf_counter() - t0
        if t == 1:
            self.stats.decode_tokens += 1
            self.stats.decode_s += dt
        else:
            self.stats.prefill_tokens += t
            self.stats.prefill_s += dt
        self.pos[slot] = end
        self.tokens[slot] = self.tokens[slot][:start] + list(ids)
        return out

    @torch.no_grad()
    def decode_batch(self, tokens: Sequence[int], slots: Sequence[int] | None = None) -> torch.Tensor:
        """One new token for each of several sequences in one forward (M = len(tokens)).

        Each sequence attends to its own slot up to its own fill level. Returns logits [B, V].
        """
        slots = list(range(len(tokens))) if slots is None else list(slots)
        if len(slots) != len(tokens):
            raise ValueError("tokens and slots must have the same length")
        if len(slots) == 1:
            return self.forward_seq(tokens, slots[0])
        for s in slots:
            self._check_room(s, self.pos[s], 1)
        pos = torch.tensor([self.pos[s] for s in slots])
        lmax = int(pos.max()) + 1
        sl = torch.tensor(slots)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        b = len(slots)
        # [B, 1, 1, Lmax]: row b sees its own positions 0..pos_b
        mask = (torch.arange(lmax).view(1, -1) <= pos.view(-1, 1)).view(b, 1, 1, lmax)
        kc, vc = self.k_cache, self.v_cache
        rep = self.H // self.KV

        def attend(i, q, k, v):
            kc[i][sl, :, pos] = k
            vc[i][sl, :, pos] = v
            if contiguous:
                kk, vv = kc[i][slots[0]:slots[0] + b, :, :lmax], vc[i][slots[0]:slots[0] + b, :, :lmax]
            else:
                kk, vv = kc[i][sl, :, :lmax], vc[i][sl, :, :lmax]
            y = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask, enable_gqa=rep > 1)
            return y.reshape(b, -1)

        t0 = time.perf_counter()
        with self._torch_threads():
            out = self._forward(torch.as_tensor(list(tokens), dtype=torch.long), pos, attend, "rows")
        self.stats.decode_tokens += b
        self.stats.decode_s += time.perf_counter() - t0
        for s, tok in zip(slots, tokens):
            self.tokens[s] = self.tokens[s][:self.pos[s]] + [int(tok)]
            self.pos[s] += 1
        return out

    # ---------------------------------------------------------------- conveniences
    def reset(self, slot: int | None = None) -> None:
        for s in range(self.slots) if slot is None else [slot]:
            self.pos[s] = 0
            self.tokens[s] = []

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """float32 logits ``[len(ids), V]`` of one sequence (slot 0, from position 0)."""
        if len(ids) > self.max_len:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.max_len}")
        return self.forward_seq(ids, slot=0, start=0, all_logits=True)

    def prefill(self, ids: Sequence[int], slot: int = 0, reuse_prefix: bool = True) -> torch.Tensor:
        """Logits ``[V]`` after ``ids``, reusing the longest prefix already in the slot's cache."""
        ids = list(ids)
        start = 0
        if reuse_prefix:
            have = self.tokens[slot]
            n = min(len(have), len(ids) - 1)  # the last prompt token always runs (we need its logits)
            while start < n and have[start] == ids[start]:
                start += 1
        return self.forward_seq(ids[start:], slot=slot, start=start)[-1]

    def generate(self, prompt: Sequence[int], max_tokens: int, params: SamplingParams | None = None,
                 stop_ids: set[int] | None = None, slot: int = 0, sampler=None) -> Iterator[int]:
        """Yield new token ids (streaming): one prefill, then one cached step per token.

        ``sampler``: optional ``(logits [V], history [T]) -> int`` replacing :func:`sample`.
        A prompt longer than the context keeps its last tokens; when the cache fills up, it
        restarts on the most recent half of the tokens (as the training model's generate does).
        """
        params = params or SamplingParams()
        prompt = list(prompt)[-self.max_len:]
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if sampler is None:
            sampler = Sampler(params, prompt_len=len(prompt), stop_ids=stop_ids, max_tokens=max_tokens)
        history = list(prompt)
        logits = self.prefill(prompt, slot)
        for _ in range(max_tokens):
            nxt = sampler(logits, torch.tensor(history, dtype=torch.long))
            yield nxt
            if stop_ids and nxt in stop_ids:
                return
            history.append(nxt)
            if self.pos[slot] >= self.max_len:
                keep = history[-(self.max_len // 2):]
                logits = self.forward_seq(keep, slot=slot, start=0)[-1]
            else:
                logits = self.forward_seq([nxt], slot=slot)[-1]

    def generate_locked(self, prompt: Sequence[int], max_tokens: int, params: SamplingParams | None = None,
                        stop_ids: set[int] | None = None) -> Iterator[int]:
        """:meth:`generate` holding :attr:`lock` for the whole generation (released on close)."""
        with self.lock:
            yield from self.generate(prompt, max_tokens, params, stop_ids)

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_tokens: int,
                       params: SamplingParams | None = None, stop_ids: set[int] | None = None) -> list[list[int]]:
        """Generate for several prompts at once: prefill each, then decode all in one forward per step."""
        if len(prompts) > self.slots:
            raise ValueError(f"{len(prompts)} prompts but the engine has {self.slots} cache slots")
        params = params or SamplingParams()
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        for p in prompts:
            if len(p) + max_tokens > self.max_len:
                raise ValueError("prompt + max_tokens exceeds the cache length")
        hist = [list(p) for p in prompts]
        logits = [self.prefill(p, slot=i) for i, p in enumerate(prompts)]
        outs: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_tokens):
            nxt = []
            for j, i in enumerate(live):
                t = sample(logits[j], params, torch.tensor(hist[i]), gen)
                outs[i].append(t)
                hist[i].append(t)
                nxt.append(t)
            keep = [j for j, i in enumerate(live) if not (stop_ids and outs[i][-1] in stop_ids)]
            live = [live[j] for j in keep]
            nxt = [nxt[j] for j in keep]
            if not live or len(outs[live[0]]) >= max_tokens:
                break
            lg = self.decode_batch(nxt, live)
            logits = [lg[j] for j in range(len(live))]
        return outs

    def generate_contrastive(self, prompt: Sequence[int], max_tokens: int, k: int = 4, alpha: float = 0.6,
                             stop_ids: set[int] | None = None, slot: int = 0) -> Iterator[int]:
        """Contrastive search (Su et al. 2022): among the top-k next tokens pick the one that is both
        likely and least similar (cosine of final hidden states) to the context. Costs k forwards a token."""
        prompt = list(prompt)
        if len(prompt) + max_tokens + 1 > self.max_len:
            raise ValueError("prompt + max_tokens exceeds the cache length")
        self.reset(slot)
        logits = self.forward_seq(prompt, slot=slot, start=0, all_logits=True)
        hidden = [self.last_hidden.clone()]
        logits = logits[-1]
        for _ in range(max_tokens):
            probs = logits.float().softmax(-1)
            top = torch.topk(probs, k)
            pos = self.pos[slot]
            cand_h, cand_logits = [], []
            for v in top.indices.tolist():  # each candidate at the same position (overwrites its K/V)
                cand_logits.append(self.forward_seq([v], slot=slot, start=pos)[-1])
                cand_h.append(self.last_hidden[-1])
            j = contrastive_select(top.values, torch.stack(cand_h), torch.cat(hidden), alpha)
            nxt = int(top.indices[j])
            if j != k - 1:  # the cache holds the last candidate's K/V: rerun the chosen one
                self.forward_seq([nxt], slot=slot, start=pos)
            hidden.append(cand_h[j].view(1, -1))
            logits = cand_logits[j]
            yield nxt
            if stop_ids and nxt in stop_ids:
                return

def load_engine(path, **kw) -> Engine:
    """An :class:`Engine` over the packed folder at ``path`` (keyword arguments go to Engine)."""
    from tritlm.formats.packed import load_packed

    return Engine(load_packed(path), **kw)
