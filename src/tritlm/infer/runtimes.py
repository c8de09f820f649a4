"""What the generator needs from a model runtime: prefill a sequence into a cache slot, decode one
token for several slots at once. One adapter per runtime; sampling and text live elsewhere.

* :class:`TorchRuntime`: the training ``Transformer`` (checkpoint, FP twin, HF / GGUF imports),
  a slot KV cache on whatever device the model is; several sequences decode in one forward.
* :class:`PackedRuntime`: the packed CPU engine (``infer/engine.py``): its slot KV cache, the fused
  C step for one sequence and one batched forward for several.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Runtime(Protocol):
    context_length: int  # positions one slot holds
    vocab_size: int
    slots: int  # sequences the runtime can hold at once (its cache may grow there on demand)

    def reserve(self, n: int) -> int:
        """Make slots ``0 .. n-1`` usable (n at most ``slots``); returns how many are."""
        ...

    def prefill(self, ids: Sequence[int], slot: int) -> torch.Tensor:
        """Make ``slot`` hold exactly ``ids`` (from position 0); float32 logits ``[V]`` after the last."""
        ...

    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        """Append ``tokens[b]`` to ``slots[b]``; float32 logits ``[B, V]``."""
        ...

    def filled(self, slot: int) -> int:
        """Positions ``slot`` holds."""
        ...

    def release(self, slot: int) -> None:
        """The sequence in ``slot`` is done (finished or cancelled): the slot may take another."""
        ...

    def step_scope(self) -> AbstractContextManager:
        """The context a generator step (its forwards and its sampling) runs in."""
        ...


class TorchRuntime:
    """The training ``Transformer`` with a slot KV cache (``model/kv_cache.SlotCache``) on the
    model's device: a decode step runs every slot's token in one forward, each row at its own
    position. The cache grows to the slots in use (``reserve``).

    A slot keeps its tokens after its sequence ends: a later prompt in that slot runs only what
    follows their common prefix (a chat's growing history, a prompt prefilled in chunks)."""

    def __init__(self, model: Any, slots: int = 1):
        self.model = model.eval()
        cfg = model.cfg
        self.context_length = int(cfg.max_seq_len)
        self.vocab_size = int(cfg.vocab_size)
        self.slots = slots
        w = model.embed_tokens.weight
        self.device = w.device
        self._dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self._shape = (cfg.kv_heads, self.context_length, cfg.head_dim)
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._n = 0  # slots allocated
        self._layers = cfg.n_layers
        self._cache = None
        self._tokens: dict[int, list[int]] = {}  # what each slot's cache holds

    def _grow(self, n: int) -> None:
        from tritlm.model.kv_cache import SlotCache

        if n <= self._n:
            return
        for cache in (self._k, self._v):
            for i in range(self._layers):
                new = torch.zeros((n, *self._shape), dtype=self._dtype, device=self.device)
                if i < len(cache):
                    new[:self._n] = cache[i]
                    cache[i] = new
                else:
                    cache.append(new)
        self._n = n
        self._cache = SlotCache(self._k, self._v)

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range (runtime has {self.slots})")
        self._grow(slot + 1)

    @torch.no_grad()
    def prefill(self, ids: Sequence[int], slot: int) -> torch.Tensor:
        ids = [int(t) for t in ids]
        self._check(slot)
        if len(ids) > self.context_length:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.context_length}")
        have = self._tokens.get(slot, [])
        n, most = 0, min(len(have), len(ids) - 1)  # the last token always runs: its logits are needed
        while n < most and have[n] == ids[n]:
            n += 1
        self._tokens[slot] = ids
        x = torch.tensor([ids[n:]], dtype=torch.long, device=self.device)
        out = self.model(x, cache=self._cache.at([slot], [n], len(ids) - n), last_only=True)[0]
        return out[0, -1].float().cpu()

    @torch.no_grad()
    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        slots = [int(s) for s in slots]
        for s in slots:
            self._check(s)
            if len(self._tokens.get(s, [])) >= self.context_length:
                raise ValueError(f"slot {s} is full: the model's context is {self.context_length}")
        pos = [len(self._tokens.get(s, [])) for s in slots]
        x = torch.tensor([[int(t)] for t in tokens], dtype=torch.long, device=self.device)
        out = self.model(x, cache=self._cache.at(slots, pos, 1))[0][:, -1]
        for tok, s in zip(tokens, slots):
            self._tokens.setdefault(s, []).append(int(tok))
        return out.float().cpu()

    def reserve(self, n: int) -> int:
        n = min(n, self.slots)
        self._grow(n)
        return n

    def filled(self, slot: int) -> int:
        return len(self._tokens.get(slot, []))

    def release(self, slot: int) -> None:
        pass  # the cache and its tokens stay for the slot's next sequence

    def step_scope(self) -> AbstractContextManager:
        return nullcontext()


class PackedRuntime:
    """The packed CPU engine. Each call holds the engine's lock (servers share one engine).

    A slot keeps what it held after its sequence ends, so the next prompt in that slot prefills
    only what differs from it (a chat's growing history). ``prefix_cache_bytes`` > 0 adds a
    :class:`~tritlm.infer.prefix_cache.PrefixCache`: a prompt sharing a prefix with any earlier
    prompt (a system prompt, few-shot examples) restores its K/V into whatever slot it runs in.
    """

    def __init__(self, engine: Any, slots: int | None = None, prefix_cache_bytes: int = 0):
        # up to ``slots`` sequences; the engine's cache grows to them as concurrency asks (reserve;
        # the server reserves all of them at start)
        self.engine = engine
        self._cap = max(slots or engine.slots, engine.slots)
        self.prefix = None
        if prefix_cache_bytes > 0:
            from tritlm.infer.prefix_cache import PrefixCache

            self.prefix = PrefixCache(engine, max_bytes=prefix_cache_bytes)
        self.context_length = int(engine.max_len)
        self.vocab_size = int(engine.cfg.vocab_size)

    @property
    def slots(self) -> int:
        return self._cap

    def reserve(self, n: int) -> int:
        self.engine.ensure_slots(min(n, self._cap))
        return min(self.engine.slots, self._cap)

    def prefill(self, ids: Sequence[int], slot: int) -> torch.Tensor:
        with self.engine.lock:
            if self.prefix is not None:
                return self.prefix.prefill(list(ids), slot)
            return self.engine.prefill(list(ids), slot)

    def prefill_many(self, prompts: Sequence[tuple[Sequence[int], int]]) -> list[torch.Tensor]:
        """Several prompts (distinct slots) in one forward of the fused layers (``Engine.prefill_many``)."""
        with self.engine.lock:
            if self.prefix is not None:
                return self.prefix.prefill_many(prompts)
            return self.engine.prefill_many(prompts)

    def step_many(self, decode: Sequence[tuple[int, int]],
                  prompts: Sequence[tuple[Sequence[int], int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Running sequences' next tokens and new prompts in one forward (``Engine.step_many``)."""
        with self.engine.lock:
            prompts = [(list(ids), slot) for ids, slot in prompts]
            if self.prefix is not None:
                for ids, slot in prompts:
                    self.prefix.restore(ids, slot)
            dec, out = self.engine.step_many(list(decode), prompts)
            if self.prefix is not None:
                for ids, slot in prompts:
                    self.prefix.store(ids, slot)
            return dec.view(len(decode), -1), out

    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        with self.engine.lock:
            return self.engine.decode_batch(list(tokens), list(slots)).view(len(tokens), -1)

    def contrastive(self, ids: Sequence[int], slot: int, max_tokens: int, k: int, alpha: float,
                    stop_ids: Iterable[int] = ()) -> Iterator[int]:
        """Contrastive search in ``slot`` (``infer/contrastive.py``), one token a ``next``, each
        under the engine's lock."""
        from tritlm.infer.contrastive import contrastive_generate

        it = contrastive_generate(self.engine, ids, max_tokens, k, alpha, set(stop_ids), slot=slot)
        try:
            while True:
                with self.engine.lock:
                    tok = next(it, None)
                if tok is None:
                    return
                yield tok
        finally:
            it.close()

    def filled(self, slot: int) -> int:
        return self.engine.pos[slot]

    def release(self, slot: int) -> None:
        pass

    def step_scope(self) -> AbstractContextManager:
        # torch single-threaded around the C kernels for the whole step: sampling's small ops
        # (softmax, max over [B, V]) ran on torch's two OpenMP threads, whose spin-wait after each
        # op then took a core from the next C step (700M, 8 sequences: 18.7-19.0 -> 16.3-16.9 ms)
        return self.engine.torch_threads_scope()


def runtime_for(loaded: Any, slots: int = 1, prefix_cache_bytes: int = 0) -> Runtime:
    """The runtime of a :class:`tritlm.api.LoadedModel` with at least ``slots`` sequence slots
    (``prefix_cache_bytes``: see :class:`PackedRuntime`; the torch runtime reuses only a slot's
    own prefix)."""
    if getattr(loaded, "engine", None) is not None:
        return PackedRuntime(loaded.engine, slots=slots, prefix_cache_bytes=prefix_cache_bytes)
    return TorchRuntime(loaded.model, slots=slots)
