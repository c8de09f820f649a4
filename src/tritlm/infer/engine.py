"""The packed CPU runtime: the training Transformer with packed Linear kinds swapped in, a slot KV
cache, and a fused C decode step.

Design choices (each measured on 2-core Zen3 boxes, see benchmarks/RESULTS.md "CPU runtime"):

* One forward pass: :func:`tritlm.nn.runtime.build_runtime_model` builds the ``Transformer`` of
  the packed model's config with every block Linear in its own kind (ternary, binary, int8, int4,
  fp16 / fp32; ``nn/packed_linear.py``). q/k/v and gate/up share their input, so each group is
  *one* module over the row-concatenated packed weights when they share a kind (4 kernel calls
  per layer instead of 7), part by part when they do not. Prefill, batched decode, tracing and
  the dense baseline all run ``Transformer.forward``.
* The KV cache is ``[slots, kv_heads, cache_len, head_dim]`` per layer; a slot is one sequence
  (:class:`SlotCache`). ``cache_len`` starts at :data:`CACHE_LEN` positions and doubles when a
  sequence needs more, up to the context: every (slot, head) is its own run of positions, so
  the stride between them, and the pages a batched step's key / value writes and reads land in,
  grow with it (700M, 8 sequences at ~45 positions: a decode step 15.8 ms with 2048 positions
  allocated, 14.4 ms with 256). The next length is allocated on a background thread once a
  sequence is past 3/4 of this one (``GrowAhead``), so growing is a copy, not a stall. Decode
  of several sequences (batching) is one forward with a row per sequence, each at its own
  position. The packed runtime's cache holds fp16 by default, as llama.cpp's does: half the
  memory, and attention (bound by reading the cache) 1.4-1.7x faster at 1000 positions; the
  math stays float32, and every path rounds keys / values to fp16 the same way
  (``kv_dtype="f32"`` keeps them exact). ``kv_dtype="q8"`` (CPU) stores int8 levels
  with a float32 scale per head row (``model/kv_cache.quantize_q8``; llama.cpp's q8_0 cache
  is the same idea): half the bytes of fp16 again, which is what batched decode spends its
  attention time on.
* Decode runs the whole layer stack in one C call (``infer/fused_decode.py``: the torch glue
  around M = 1 kernels cost as much as the kernels on 2 cores), for one sequence or a batch of
  them as rows (each kernel then reads the weights once for all); the torch forward is its
  reference in the tests. Any kind takes the fused path as long as each q|k|v and gate|up
  group shares one quantised kind; otherwise decode stays on the forward pass.
* The LM head is exact by default: the stored fp16 matrix read as fp16 by a C GEMV, or a float32
  matmul when the model stores it in float32. ``head="t4"`` stores it as four balanced-ternary
  digit planes (approximate, 8 bits per weight) run by the ternary kernel.
* ``backend="dense"`` gives the dense PyTorch baseline (F.linear over the dequantised weights,
  float32 or bfloat16) through the same forward, for ``tritlm bench``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tritlm.errors import ConfigError
from tritlm.formats.packed import PackedModel
from tritlm.infer.fused_decode import FusedDecoder
from tritlm.infer.hooks import install_hooks
from tritlm.infer.sampling import SamplingParams
from tritlm.kernels.cpu import set_num_threads
from tritlm.model.kv_cache import GrowAhead, SlotCache, cache_zeros, kv_row_width, regrow
from tritlm.model.transformer import Transformer
from tritlm.nn.packed_linear import BACKENDS
from tritlm.nn.placement import place_packed_weights
from tritlm.nn.runtime import HEADS, build_runtime_model

log = logging.getLogger(__name__)

__all__ = ["HEADS", "KV_DTYPES", "Engine", "EngineStats", "SlotCache", "load_engine"]

KV_DTYPES = ("auto", "f16", "q8", "f32")
CACHE_LEN = 256  # positions a slot's KV cache holds at first (see the module docstring)


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
        backend: "packed" (the layers' C kernels, CPU), "dense" (F.linear baseline) or "triton"
            (the GPU runtime: the Triton kernels on ``device``).
        dense_dtype: float32 or bfloat16 for ``backend="dense"``.
        head: "auto" (exact: "f16" when the model stores its head in fp16, else "fp32"), "f16"
            (fp16 weights, C GEMV), "fp32" (float32 matmul) or "t4" (4 ternary digit planes,
            approximate, 8 bits per weight).
        slots: how many sequences the KV cache holds (batch size).
        max_len: positions a slot may hold (default: the model's context).
        cache_len: positions allocated per slot at first (default :data:`CACHE_LEN`, at most
            ``max_len``); the cache doubles as sequences need more (``ensure_len``).
        torch_threads: intra-op threads of torch while the engine runs (None: leave as is); 1
            keeps torch's OpenMP workers from spinning against the kernel threads on small ops.
        fused: decode single tokens with one C call for all layers (``infer/fused_decode.py``)
            when the compiled kernels are available; False keeps every step on the forward pass.
        device: where weights and KV cache live ("cpu"; "cuda" with the triton or dense backend).
            Logits come back to the CPU, where the generator samples.
        kv_dtype: "auto" ("f16" for the packed backend, "f32" otherwise: the dense baseline and the
            GPU runtime keep float32), "f16" (keys/values rounded to fp16 as stored), "q8" (int8
            with a scale per head row; the CPU only) or "f32".
        cuda_graphs: on CUDA, replay decode steps from CUDA graphs (``infer/graph_decode.py``).
    """

    def __init__(self, pm: PackedModel, *, threads: int | None = None, backend: str = "packed",
                 dense_dtype: torch.dtype = torch.float32, head: str = "auto", slots: int = 1,
                 max_len: int | None = None, torch_threads: int | None = 1, fused: bool = True,
                 device: torch.device | str = "cpu", cuda_graphs: bool = True, kv_dtype: str = "auto",
                 cache_len: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        if kv_dtype == "auto":
            kv_dtype = "f16" if backend == "packed" else "f32"
        if kv_dtype == "q8" and self.device.type != "cpu":
            raise ConfigError("the q8 KV cache is the CPU runtime's; use kv_dtype (--kv-dtype) f16 or f32 on the GPU")
        self.kv_dtype = kv_dtype
        self.pm = pm
        self.cfg = c = pm.config
        self.backend = backend
        self.threads = threads
        self.torch_threads = torch_threads
        if threads is not None:
            set_num_threads(threads)
        self.tokenizer = pm.tokenizer
        self.max_len = max_len or c.max_seq_len
        self.model = build_runtime_model(Transformer, c, pm.linears, pm.fp, backend=backend,
                                         dense_dtype=dense_dtype, head=head, max_len=self.max_len,
                                         device=self.device)
        self.head_kind = self.model.lm_head.kind
        place_packed_weights([m.runner for m in self.linear_modules()] + [self.head], pm)  # on huge pages
        self.H, self.KV, self.hd = c.n_heads, c.kv_heads, c.head_dim
        self.slots = slots
        kvt = {"f16": torch.float16, "q8": torch.int8}.get(kv_dtype, torch.float32)
        if kvt == torch.int8 and self.hd % 4:
            raise ConfigError(f"the q8 KV cache needs a head size divisible by 4 (its rows end in a "
                             f"float32 scale), this model's is {self.hd}")
        self.cache_len = min(self.max_len, CACHE_LEN if cache_len is None else cache_len)
        if self.cache_len < 1:
            raise ValueError(f"cache_len must be >= 1, got {cache_len}")
        shape = (slots, self.KV, self.cache_len, kv_row_width(kvt, self.hd))
        self.k_cache = [cache_zeros(shape, kvt, self.device) for _ in range(c.n_layers)]
        self.v_cache = [cache_zeros(shape, kvt, self.device) for _ in range(c.n_layers)]
        self.cache = SlotCache(self.k_cache, self.v_cache)
        # the next cache length, allocated once a sequence is past 3/4 of this one
        self.grow_ahead = GrowAhead() if self.device.type == "cpu" else None
        self.pos = [0] * slots  # filled positions per slot
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # what each slot's cache holds
        self.stats = EngineStats()
        self.tracer: Callable[[str, int, torch.Tensor], None] | None = None  # see infer.profile
        self.timer: Callable[[str], contextlib.AbstractContextManager] | None = None
        self.last_hidden: torch.Tensor | None = None  # [rows, D] after the final norm
        install_hooks(self)
        # One cache, one caller at a time: servers share a LoadedModel across request threads.
        self.lock = threading.RLock()
        half = self.hd // 2
        rope_sin = self.model.rope_sin[:self.max_len]
        self.cos = self.model.rope_cos[:self.max_len].contiguous()
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated): the C step's form
        self.sin_signed = torch.cat([-rope_sin[:, :half], rope_sin[:, half:]], dim=1).contiguous()
        self.fused = FusedDecoder.create(self) if fused and backend == "packed" else None
        self.graphs = None
        if self.device.type == "cuda" and cuda_graphs:
            from tritlm.infer.graph_decode import GraphDecoder

            self.graphs = GraphDecoder(self)

    @property
    def head(self):
        """The LM head runner: ``head(x [M, D], out [M, V])``."""
        return self.model.lm_head.runner

    def linear_modules(self) -> list:
        """Every block Linear module of the runtime model (fused groups as one), in forward order."""
        out = []
        for blk in self.model.layers:
            out += [blk.self_attn.qkv_proj, blk.self_attn.o_proj, blk.mlp.gate_up_proj, blk.mlp.down_proj]
        return out

    @contextlib.contextmanager
    def torch_threads_scope(self):
        """torch's intra-op threads set to ``torch_threads`` inside (the engine's forwards; the
        packed runtime runs whole generator steps, sampling included, in it)."""
        if self.torch_threads is None or torch.get_num_threads() == self.torch_threads:
            yield
            return
        old = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    # ---------------------------------------------------------------- forward
    def _fused_step(self, toks: Sequence[int], slots: Sequence[int], pos: Sequence[int]) -> torch.Tensor:
        """Tokens through the C decode step (the forward pass's math), one row per sequence; logits [M, V]."""
        m = len(toks)
        h = torch.empty(m, self.cfg.dim)
        t = time.perf_counter()
        self.fused.step(list(toks), list(slots), list(pos), h, self.threads or 0)
        out = self.head(h, torch.empty(m, self.cfg.vocab_size))
        self.stats.native_s += time.perf_counter() - t
        self.last_hidden = h
        return out

    def _fused_prefill(self, ids: Sequence[int], slot: int, start: int, all_logits: bool) -> torch.Tensor:
        """A prompt through the C layers (one sequence, its tokens as the rows); logits of every
        position (``all_logits``) or of the last, as the torch path returns them."""
        h = torch.empty(len(ids), self.cfg.dim)
        self.fused.prefill([int(i) for i in ids], slot, start, h, self.threads or 0)
        rows = h if all_logits else h[-1:]
        out = self.head(rows, torch.empty(rows.shape[0], self.cfg.vocab_size))
        self.last_hidden = h
        return out

    def _host(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits where the generator samples: float32 on the CPU."""
        return logits if self.device.type == "cpu" else logits.float().cpu()

    def _check_ids(self, ids: Sequence[int]) -> None:
        v = self.cfg.vocab_size
        bad = next((i for i in ids if not 0 <= int(i) < v), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary of {v}")

    def _check_room(self, slot: int, start: int, t: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range (engine has {self.slots})")
        if start + t > self.max_len:
            raise ValueError(f"{start + t} positions exceed the context of {self.max_len}")
        n = start + t
        self.ensure_len(n)
        # a sequence past 3/4 of the cache: its next length on the way (not from ensure_len, which
        # an up-front allocation such as serve --kv-len calls too)
        if self.grow_ahead is not None and 4 * n > 3 * self.cache_len and self.cache_len < self.max_len:
            self.grow_ahead.prepare([self.k_cache, self.v_cache], self.slots, min(2 * self.cache_len, self.max_len))

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
        self._check_ids(ids)
        end = start + t
        t0 = time.perf_counter()
        with self.torch_threads_scope():
            out = None
            if t == 1 and self.fused is not None and self.tracer is None and self.timer is None:
                out = self._fused_step([int(ids[0])], [slot], [start])
            elif self.fused is not None and self.tracer is None and self.timer is None:
                out = self._fused_prefill(ids, slot, start, all_logits)
            elif t == 1 and self.graphs is not None and self.tracer is None and self.timer is None:
                out = self.graphs.step([int(ids[0])], [slot], [start])
                out = None if out is None else self._host(out)
            if out is None:
                idx = torch.as_tensor(list(ids), dtype=torch.long).view(1, t).to(self.device)
                out = self._host(self.model(idx, cache=self.cache.at([slot], [start], t),
                                            last_only=not all_logits)[0][0])
        dt = time.perf_counter() - t0
        if t == 1:
            self.stats.decode_tokens += 1
            self.stats.decode_s += dt
        else:
            self.stats.prefill_tokens += t
            self.stats.prefill_s += dt
        self.pos[slot] = end
        del self.tokens[slot][start:]
        self.tokens[slot].extend(int(i) for i in ids)
        return out

    @torch.no_grad()
    def decode_batch(self, tokens: Sequence[int], slots: Sequence[int] | None = None) -> torch.Tensor:
        """One new token for each of several sequences in one forward (a row per sequence).

        Each sequence attends to its own slot up to its own fill level. Returns logits [B, V].
        """
        slots = list(range(len(tokens))) if slots is None else list(slots)
        if len(slots) != len(tokens):
            raise ValueError("tokens and slots must have the same length")
        if len(slots) == 1:
            return self.forward_seq(tokens, slots[0])
        for s in slots:
            self._check_room(s, self.pos[s], 1)
        self._check_ids(tokens)
        if len(set(slots)) != len(slots):
            raise ValueError("each sequence of a batch needs its own slot")
        b = len(slots)
        t0 = time.perf_counter()
        with self.torch_threads_scope():
            out = None
            if self.fused is not None and self.tracer is None and self.timer is None:
                out = self._fused_step([int(t) for t in tokens], slots, [self.pos[s] for s in slots])
            elif self.graphs is not None and self.tracer is None and self.timer is None:
                out = self.graphs.step([int(t) for t in tokens], slots, [self.pos[s] for s in slots])
                out = None if out is None else self._host(out)
            if out is None:
                idx = torch.as_tensor(list(tokens), dtype=torch.long).view(b, 1).to(self.device)
                out = self._host(self.model(idx, cache=self.cache.at(slots, [self.pos[s] for s in slots], 1))[0][:, 0])
        self.stats.decode_tokens += b
        self.stats.decode_s += time.perf_counter() - t0
        for s, tok in zip(slots, tokens):
            del self.tokens[s][self.pos[s]:]  # in place: a copy of the whole history per token was O(context)
            self.tokens[s].append(int(tok))
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

    def _reusable(self, ids: Sequence[int], slot: int) -> int:
        """How many leading ``ids`` the slot's cache already holds (the last one always runs: its
        logits are needed)."""
        have, start = self.tokens[slot], 0
        n = min(len(have), len(ids) - 1)
        while start < n and have[start] == ids[start]:
            start += 1
        return start

    def prefill(self, ids: Sequence[int], slot: int = 0, reuse_prefix: bool = True) -> torch.Tensor:
        """Logits ``[V]`` after ``ids``, reusing the longest prefix already in the slot's cache."""
        ids = list(ids)
        start = self._reusable(ids, slot) if reuse_prefix else 0
        return self.forward_seq(ids[start:], slot=slot, start=start)[-1]

    @torch.no_grad()
    def prefill_many(self, prompts: Sequence[tuple[Sequence[int], int]],
                     reuse_prefix: bool = True) -> list[torch.Tensor]:
        """Logits ``[V]`` after each ``(ids, slot)`` (distinct slots), as :meth:`prefill` gives them
        one by one, but all prompts through the fused C layers as the rows of one call (the weights
        are read once per chunk of rows, not once per prompt: requests that arrive together)."""
        items = self._prompt_items(prompts, reuse_prefix)
        if len(items) < 2 or not self._rows_ok():
            return [self.forward_seq(ids, slot=slot, start=start)[-1] for ids, slot, start in items]
        return list(self._rows_forward(items, decode=0))

    @torch.no_grad()
    def step_many(self, decode: Sequence[tuple[int, int]], prompts: Sequence[tuple[Sequence[int], int]],
                  reuse_prefix: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward for the next token of running sequences (``decode``: (token, slot)) and the
        prompts of new ones (``prompts``: (ids, slot)), all in distinct slots: logits ``[B, V]`` of
        the decode rows and ``[V]`` after each prompt, as :meth:`decode_batch` and
        :meth:`prefill_many` give them apart. New requests then wait for no batch forward, and the
        weights are read once for both."""
        items = [([int(t)], slot, self.pos[slot]) for t, slot in decode]
        items += self._prompt_items(prompts, reuse_prefix)
        if not self._rows_ok():
            d = (self.decode_batch([t for t, _ in decode], [s for _, s in decode]) if decode
                 else torch.empty(0, self.cfg.vocab_size))
            return d, self.prefill_many(prompts, reuse_prefix)
        out = self._rows_forward(items, decode=len(decode))
        return out[:len(decode)], list(out[len(decode):])

    def _prompt_items(self, prompts, reuse_prefix: bool) -> list[tuple[list[int], int, int]]:
        """(the ids still to run, slot, their first position) of each prompt."""
        items = []
        for ids, slot in prompts:
            ids = [int(t) for t in ids]
            if not ids:
                raise ValueError("ids must not be empty")
            start = self._reusable(ids, slot) if reuse_prefix else 0
            items.append((ids[start:], slot, start))
        return items

    def _rows_ok(self) -> bool:
        return self.fused is not None and self.tracer is None and self.timer is None

    def _rows_forward(self, items: list[tuple[list[int], int, int]], decode: int) -> torch.Tensor:
        """``items`` (ids, slot, start) as the rows of fused calls; logits [len(items), V] after each
        item's last row. The first ``decode`` items count as decode tokens in the stats."""
        if len({slot for _, slot, _ in items}) != len(items):
            raise ValueError("each sequence of a batch needs its own slot")
        toks, slots, pos, last = [], [], [], []
        for ids, slot, start in items:
            self._check_room(slot, start, len(ids))
            self._check_ids(ids)
            toks += ids
            slots += [slot] * len(ids)
            pos += range(start, start + len(ids))
            last.append(len(toks) - 1)
        t0 = time.perf_counter()
        with self.torch_threads_scope():
            h = torch.empty(len(toks), self.cfg.dim)
            self.fused.forward_rows([int(t) for t in toks], slots, pos, h, self.threads or 0)
            h = h[last].contiguous()
            out = self.head(h, torch.empty(len(items), self.cfg.vocab_size))
        dt = time.perf_counter() - t0
        self.stats.native_s += dt
        self.stats.decode_tokens += decode
        self.stats.prefill_tokens += len(toks) - decode
        self.stats.prefill_s += dt
        for ids, slot, start in items:
            self.tokens[slot] = self.tokens[slot][:start] + ids
            self.pos[slot] = start + len(ids)
        self.last_hidden = h  # each item's last position, a row each
        return out

    def ensure_slots(self, n: int) -> None:
        """Grow the KV cache to hold at least ``n`` sequences (what the slots hold is kept)."""
        if n > self.slots:
            self._regrow(n, self.cache_len)
            self.pos += [0] * (n - len(self.pos))
            self.tokens += [[] for _ in range(n - len(self.tokens))]

    def ensure_len(self, n: int) -> None:
        """Grow the KV cache so that each slot holds ``n`` positions (``n <= max_len``): doubled
        at least, so a long generation reallocates a few times, not every token."""
        if n > self.cache_len:
            length = self.cache_len
            while length < n:
                length *= 2
            self._regrow(self.slots, min(length, self.max_len))

    def _regrow(self, slots: int, length: int) -> None:
        with self.lock:
            fresh = self.grow_ahead.take(slots, length) if self.grow_ahead is not None else None
            log.info("KV cache: %d slots x %d positions -> %d x %d (%s)", self.slots, self.cache_len, slots, length,
                     "allocated ahead" if fresh is not None else
                     "a stall while it is allocated; cache_len, serve --kv-len, allocates positions up front")
            regrow([self.k_cache, self.v_cache], slots, length, fresh)
            self.slots, self.cache_len = slots, length
            if self.fused is not None:  # the C context points into the old cache buffers
                self.fused = FusedDecoder.create(self)
            if self.graphs is not None:  # so do the recorded graphs
                self.graphs.reset()

    def generate(self, prompt: Sequence[int], max_tokens: int, params: SamplingParams | None = None,
                 stop_ids: set[int] | None = None, slot: int = 0) -> Iterator[int]:
        """Yield new token ids (streaming) through the one generation path (``infer/generator.py``),
        in ``slot``; ends after yielding a token of ``stop_ids``."""
        from tritlm.infer.generator import Request, generate
        from tritlm.infer.runtimes import PackedRuntime

        reqs = [Request(prompt, max_tokens, params or SamplingParams())]
        for ev in generate(PackedRuntime(self), reqs, stop_ids=stop_ids or (), slots=[slot]):
            if ev.finish == "error":
                raise ValueError(ev.error)
            if ev.token is not None:
                yield ev.token

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_tokens: int,
                       params: SamplingParams | None = None, stop_ids: set[int] | None = None) -> list[list[int]]:
        """Generate for several prompts at once (one decode forward per step for all of them);
        the cache grows to one slot per prompt."""
        from tritlm.infer.generator import Request, generate
        from tritlm.infer.runtimes import PackedRuntime

        self.ensure_slots(len(prompts))
        reqs = [Request(p, max_tokens, params or SamplingParams()) for p in prompts]
        outs: dict[int, list[int]] = {id(r): [] for r in reqs}
        for ev in generate(PackedRuntime(self), reqs, stop_ids=stop_ids or (), max_batch=len(prompts)):
            if ev.finish == "error":
                raise ValueError(ev.error)
            if ev.token is not None:
                outs[id(ev.seq.req)].append(ev.token)
        return [outs[id(r)] for r in reqs]


def load_engine(path, **kw) -> Engine:
    """An :class:`Engine` over the packed folder at ``path`` (keyword arguments go to Engine)."""
    from tritlm.formats.packed import load_packed

    return Engine(load_packed(path), **kw)
