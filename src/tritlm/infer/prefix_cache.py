"""A prefix cache for repeated prompts: K/V snapshots keyed by token prefix, LRU within a byte budget.

``Engine.prefill`` already reuses what its own slot holds (multi-turn chat extends the previous
prompt); :class:`PrefixCache` also covers prompts that share a prefix with any *earlier* prompt (a
long system prompt, few-shot examples) across slots and after other prompts were run.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch

from tritlm.infer.engine import Engine

log = logging.getLogger(__name__)


class PrefixCache:
    def __init__(self, engine: Engine, max_bytes: int = 256 << 20, min_tokens: int = 4, max_entries: int = 256):
        self.engine = engine
        self.max_bytes = max_bytes
        # a lookup compares the prompt with every entry in Python: a small model's entries are tiny,
        # so the byte budget alone would let the scan grow into thousands a prefill
        self.max_entries = max_entries
        self.min_tokens = min_tokens
        self.entries: OrderedDict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    def _entry_bytes(self, n: int) -> int:
        e = self.engine
        return 2 * e.cfg.n_layers * e.KV * n * e.k_cache[0].shape[-1] * e.k_cache[0].element_size()

    def longest(self, ids: Sequence[int]) -> tuple[tuple[int, ...] | None, int]:
        """The stored prefix sharing the most leading tokens with ``ids`` and that count."""
        best, best_n = None, 0
        for key in self.entries:
            n = 0
            m = min(len(key), len(ids) - 1)  # keep >= 1 token to run (its logits are needed)
            while n < m and key[n] == ids[n]:
                n += 1
            if n > best_n:
                best, best_n = key, n
        return best, best_n

    def prefill(self, ids: Sequence[int], slot: int = 0) -> torch.Tensor:
        """Like ``Engine.prefill`` but restores the longest cached prefix first; stores the prompt."""
        ids = list(ids)
        self.restore(ids, slot)
        logits = self.engine.prefill(ids, slot=slot)  # reuses the (restored) slot prefix
        self.store(ids, slot)
        return logits

    def prefill_many(self, prompts: Sequence[tuple[Sequence[int], int]]) -> list[torch.Tensor]:
        """``Engine.prefill_many`` with each prompt's cached prefix restored first; stores them."""
        prompts = [(list(ids), slot) for ids, slot in prompts]
        for ids, slot in prompts:
            self.restore(ids, slot)
        out = self.engine.prefill_many(prompts)
        for ids, slot in prompts:
            self.store(ids, slot)
        return out

    def restore(self, ids: list[int], slot: int) -> None:
        """The longest cached prefix of ``ids`` into ``slot``, when it beats what the slot holds."""
        e = self.engine
        key, n = self.longest(ids)
        have = e.tokens[slot]
        own = 0
        while own < min(len(have), len(ids) - 1) and have[own] == ids[own]:
            own += 1
        if key is not None and n >= self.min_tokens and n > own:
            ks, vs = self.entries[key]
            self.entries.move_to_end(key)
            e.ensure_len(n)
            for i in range(e.cfg.n_layers):
                e.k_cache[i][slot, :, :n] = ks[i][:, :n]
                e.v_cache[i][slot, :, :n] = vs[i][:, :n]
            e.pos[slot] = n
            e.tokens[slot] = ids[:n]
            self.hits += 1
            self.reused_tokens += n
        elif own >= self.min_tokens:
            self.hits += 1
            self.reused_tokens += own
        else:
            self.misses += 1

    def store(self, ids: Sequence[int], slot: int = 0) -> None:
        e = self.engine
        key = tuple(ids)
        n = len(key)
        if n < self.min_tokens or key in self.entries or e.tokens[slot][:n] != list(key):
            return
        size = self._entry_bytes(n)
        if size > self.max_bytes:
            return
        while self.entries and (self.bytes + size > self.max_bytes or len(self.entries) >= self.max_entries):
            old, _ = self.entries.popitem(last=False)
            self.bytes -= self._entry_bytes(len(old))
        self.entries[key] = ([e.k_cache[i][slot, :, :n].clone() for i in range(e.cfg.n_layers)],
                             [e.v_cache[i][slot, :, :n].clone() for i in range(e.cfg.n_layers)])
        self.bytes += size
