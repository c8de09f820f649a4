"""What the generator needs from a model runtime: prefill a sequence into a cache slot, decode one
token for several slots at once. One adapter per runtime; sampling and text live elsewhere.

* :class:`TorchRuntime`: the training ``Transformer`` (checkpoint, FP twin, HF / GGUF imports),
  one ``KVCache`` per slot, on whatever device the model is.
* :class:`PackedRuntime`: the packed CPU engine (``infer/engine.py``): its slot KV cache, the fused
  C step for one sequence and one batched forward for several.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Runtime(Protocol):
    context_length: int  # positions one slot holds
    vocab_size: int
    slots: int  # sequences the runtime holds at once

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


class TorchRuntime:
    """The training ``Transformer`` with one KV cache per slot (allocated on first use)."""

    def __init__(self, model: Any, slots: int = 1):
        self.model = model.eval()
        self.context_length = int(model.cfg.max_seq_len)
        self.vocab_size = int(model.cfg.vocab_size)
        self.slots = slots
        self.device = model.embed_tokens.weight.device
        self._caches: dict[int, Any] = {}

    def _cache(self, slot: int):
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range (runtime has {self.slots})")
        if slot not in self._caches:
            self._caches[slot] = self.model.new_cache(1, self.context_length)
        return self._caches[slot]

    @torch.no_grad()
    def prefill(self, ids: Sequence[int], slot: int) -> torch.Tensor:
        cache = self._cache(slot)
        cache.reset()
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits, _ = self.model(x, cache=cache, last_only=True)
        return logits[0, -1].float().cpu()

    @torch.no_grad()
    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        # each slot's cache has its own fill level, which the training KVCache does not batch
        rows = []
        for tok, slot in zip(tokens, slots):
            x = torch.tensor([[int(tok)]], dtype=torch.long, device=self.device)
            rows.append(self.model(x, cache=self._cache(slot))[0][0, -1])
        return torch.stack(rows).float().cpu()

    def filled(self, slot: int) -> int:
        return self._cache(slot).pos

    def release(self, slot: int) -> None:
        pass  # the cache is kept for the slot's next sequence (no reallocation)


class PackedRuntime:
    """The packed CPU engine. Each call holds the engine's lock (servers share one engine).

    A slot keeps what it held after its sequence ends, so the next prompt in that slot prefills
    only what differs from it (a chat's growing history; requests sharing a system prompt).
    """

    def __init__(self, engine: Any, slots: int | None = None):
        if slots is not None:
            engine.ensure_slots(slots)
        self.engine = engine
        self.context_length = int(engine.max_len)
        self.vocab_size = int(engine.cfg.vocab_size)

    @property
    def slots(self) -> int:  # the engine may grow later (another runtime asking for more)
        return self.engine.slots

    def prefill(self, ids: Sequence[int], slot: int) -> torch.Tensor:
        with self.engine.lock:
            return self.engine.prefill(list(ids), slot)

    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        with self.engine.lock:
            return self.engine.decode_batch(list(tokens), list(slots)).view(len(tokens), -1)

    def filled(self, slot: int) -> int:
        return self.engine.pos[slot]

    def release(self, slot: int) -> None:
        pass


def runtime_for(loaded: Any, slots: int = 1) -> Runtime:
    """The runtime of a :class:`tritlm.api.LoadedModel` with at least ``slots`` sequence slots."""
    if getattr(loaded, "engine", None) is not None:
        return PackedRuntime(loaded.engine, slots=slots)
    return TorchRuntime(loaded.model, slots=slots)
