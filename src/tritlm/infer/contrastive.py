"""Contrastive search (Su et al. 2022) on the packed engine: among the top-k next tokens pick the
one that is both likely and least similar (cosine of final hidden states) to the context.

Deterministic: it replaces sampling (``top_k`` is its k; temperature, penalties and filters do not
apply). Each token costs k single-token forwards at the same position (each overwrites the
last's K/V), so it runs outside the batched decode: the generator steps it one token a step in its
own slot (``Request.penalty_alpha``, ``PackedRuntime.contrastive``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tritlm.errors import ConfigError
from tritlm.infer.engine import Engine
from tritlm.infer.sampling import contrastive_select


def contrastive_generate(eng: Engine, prompt: Sequence[int], max_tokens: int, k: int = 4, alpha: float = 0.6,
                         stop_ids: set[int] | None = None, slot: int = 0) -> Iterator[int]:
    """Yield up to ``max_tokens`` ids chosen by contrastive search (ends after a ``stop_ids`` one)."""
    prompt = list(prompt)
    if k < 2:
        raise ConfigError(f"contrastive search needs top_k >= 2 candidates, got {k}")
    if not 0 <= alpha <= 1:
        raise ConfigError(f"contrastive search: penalty_alpha {alpha} must lie in [0, 1]")
    if len(prompt) + max_tokens + 1 > eng.max_len:
        raise ConfigError(f"prompt + max_tokens exceeds the cache length {eng.max_len}")
    eng.reset(slot)
    logits = eng.forward_seq(prompt, slot=slot, start=0, all_logits=True)
    hidden = [eng.last_hidden.clone()]
    logits = logits[-1]
    for _ in range(max_tokens):
        top = torch.topk(logits.float().softmax(-1), min(k, logits.numel()))
        pos = eng.pos[slot]
        cand_h, cand_logits = [], []
        for v in top.indices.tolist():  # each candidate at the same position (overwrites its K/V)
            cand_logits.append(eng.forward_seq([v], slot=slot, start=pos)[-1])
            cand_h.append(eng.last_hidden[-1])
        j = contrastive_select(top.values, torch.stack(cand_h), torch.cat(hidden), alpha)
        nxt = int(top.indices[j])
        if j != len(cand_h) - 1:  # the cache holds the last candidate's K/V: rerun the chosen one
            eng.forward_seq([nxt], slot=slot, start=pos)
        hidden.append(cand_h[j].view(1, -1))
        logits = cand_logits[j]
        yield nxt
        if stop_ids and nxt in stop_ids:
            return
