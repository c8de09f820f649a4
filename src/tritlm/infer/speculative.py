"""Speculative decoding (Leviathan et al. 2023, greedy form) with a smaller draft engine.

The draft proposes ``k`` tokens one at a time (cheap); the target scores the current token plus
all ``k`` proposals in *one* forward (M = k + 1: the GEMM kernel path, which reads the weights
once for all rows), accepts the longest prefix of proposals equal to its own greedy choices and
adds its own next token. The output is exactly the target's greedy decoding; a rejected suffix
is rolled back by moving the cache fill level (stale K/V past it are simply overwritten).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tritlm.infer.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class SpecStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def speculative_generate(target: Engine, draft: Engine, prompt: Sequence[int], max_tokens: int, k: int = 4,
                         stop_ids: set[int] | None = None, stats: SpecStats | None = None,
                         slot: int = 0) -> Iterator[int]:
    """Yield the target's greedy continuation of ``prompt``, ``max_tokens`` at most."""
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError("draft and target must share the vocabulary")
    if k < 1:
        raise ValueError("k must be >= 1")
    prompt = list(prompt)
    limit = min(target.max_len, draft.max_len)
    if len(prompt) + max_tokens + k + 1 > limit:
        raise ValueError(f"prompt + max_tokens + k exceeds the cache length {limit}")
    stats = stats if stats is not None else SpecStats()
    stop_ids = stop_ids or set()
    cur = int(target.prefill(prompt, slot).argmax())
    draft.prefill(prompt, slot)
    base = len(prompt)  # positions filled in the target's cache (cur is not in it yet)
    n_out = 0
    while True:
        yield cur
        n_out += 1
        if n_out >= max_tokens or cur in stop_ids:
            return
        # the draft catches up to base (it may lag after a full acceptance) and proposes k tokens
        kk = min(k, max_tokens - n_out)
        ctx_tail = [cur]
        proposals: list[int] = []
        dl = draft.forward_seq(ctx_tail, slot=slot, start=base)[-1]
        for i in range(kk):
            t = int(dl.argmax())
            proposals.append(t)
            if i + 1 < kk:
                dl = draft.forward_seq([t], slot=slot)[-1]
        tl = target.forward_seq([cur] + proposals, slot=slot, start=base, all_logits=True)
        preds = tl.argmax(-1).tolist()
        n_acc = 0
        while n_acc < kk and proposals[n_acc] == preds[n_acc]:
            n_acc += 1
        stats.rounds += 1
        stats.proposed += kk
        stats.accepted += n_acc
        for t in proposals[:n_acc]:
            yield t
            n_out += 1
            if n_out >= max_tokens or t in stop_ids:
                return
        base += 1 + n_acc  # cur and the accepted proposals are now in the target's cache
        target.pos[slot] = base
        target.tokens[slot] = target.tokens[slot][:base]
        # the draft's cache holds cur + proposals[:kk-1]; keep what matches the accepted context
        draft.pos[slot] = min(draft.pos[slot], base)
        draft.tokens[slot] = draft.tokens[slot][:draft.pos[slot]]
        if draft.pos[slot] < base:  # full acceptance: the last proposal never ran through the draft
            draft.forward_seq(proposals[n_acc - 1:n_acc], slot=slot, start=draft.pos[slot])
        cur = preds[n_acc]
