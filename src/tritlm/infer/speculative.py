"""Speculative decoding (Leviathan et al. 2023) with a smaller draft engine, greedy or sampled.

The draft proposes ``k`` tokens one at a time (cheap); the target scores the current token plus
all ``k`` proposals in *one* forward (M = k + 1: the GEMM kernel path, which reads the weights
once for all rows). Proposal ``x`` is accepted with probability ``min(1, p(x) / q(x))`` (``p``:
the target's distribution, ``q``: the draft's, both after the request's penalties, bias and
filters: ``sampling.process_logits``); at the first rejection the token is drawn from
``norm(max(0, p - q))``, and after a full acceptance from the target's next distribution. The
output is distributed exactly as the target's own sampling; with temperature 0 both
distributions are one-hot, so it is exactly the target's greedy decoding. A rejected suffix is
rolled back by moving the cache fill level (stale K/V past it are simply overwritten).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tritlm.errors import ConfigError
from tritlm.infer.engine import Engine
from tritlm.infer.generator import Event, Request, Seq, seq_events
from tritlm.infer.sampling import SamplingParams, draw, process_logits

log = logging.getLogger(__name__)


@dataclass
class SpecStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class _Dist:
    """The request's next-token distribution from raw logits and the history so far."""

    def __init__(self, params: SamplingParams, n_prompt: int, seed: int | None):
        if params.mirostat or params.must_include:
            raise ConfigError("speculative decoding does not support mirostat or must_include")
        self.p, self.n_prompt = params, n_prompt
        self.gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, logits: torch.Tensor, hist: list[int]) -> torch.Tensor:
        h = torch.tensor(hist, dtype=torch.long)
        lg = process_logits(logits, self.p, h, h[self.n_prompt:])
        if self.p.greedy:
            return torch.nn.functional.one_hot(lg.argmax(), lg.numel()).float()
        return lg.softmax(-1)

    def draw(self, probs: torch.Tensor) -> int:
        return draw(probs, self.gen)

    def accept(self, p: torch.Tensor, q: torch.Tensor, t: int) -> bool:
        if float(p[t]) >= float(q[t]):  # includes the greedy case (both one-hot at t)
            return True
        return float(torch.rand(1, generator=self.gen)) * float(q[t]) < float(p[t])


def speculative_generate(target: Engine, draft: Engine, prompt: Sequence[int], max_tokens: int, k: int = 4,
                         stop_ids: set[int] | None = None, stats: SpecStats | None = None,
                         slot: int = 0, params: SamplingParams | None = None) -> Iterator[int]:
    """Yield the target's continuation of ``prompt`` (``params``: greedy by default), ``max_tokens`` at most."""
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ConfigError("draft and target must share the vocabulary")
    if k < 1:
        raise ConfigError("k must be >= 1")
    prompt = list(prompt)
    limit = min(target.max_len, draft.max_len)
    if len(prompt) + max_tokens + k + 1 > limit:
        raise ConfigError(f"prompt + max_tokens + k exceeds the cache length {limit}")
    params = params or SamplingParams(temperature=0)
    dist = _Dist(params, len(prompt), params.seed)
    stats = stats if stats is not None else SpecStats()
    stop_ids = stop_ids or set()
    hist = list(prompt)
    cur = dist.draw(dist(target.prefill(prompt, slot), hist))
    draft.prefill(prompt, slot)
    base = len(prompt)  # positions filled in the target's cache (cur is not in it yet)
    n_out = 0
    while True:
        yield cur
        n_out += 1
        if n_out >= max_tokens or cur in stop_ids:
            return
        hist.append(cur)
        # the draft catches up to base (it may lag after a full acceptance) and proposes k tokens
        kk = min(k, max_tokens - n_out)
        proposals: list[int] = []
        qs: list[torch.Tensor] = []
        dl = draft.forward_seq([cur], slot=slot, start=base)[-1]
        for i in range(kk):
            q = dist(dl, hist + proposals)
            proposals.append(dist.draw(q))
            qs.append(q)
            if i + 1 < kk:
                dl = draft.forward_seq([proposals[-1]], slot=slot)[-1]
        tl = target.forward_seq([cur] + proposals, slot=slot, start=base, all_logits=True)
        n_acc, nxt = 0, None
        for i, t in enumerate(proposals):
            p = dist(tl[i], hist + proposals[:i])
            if dist.accept(p, qs[i], t):
                n_acc += 1
                continue
            rest = (p - qs[i]).clamp(min=0)
            nxt = dist.draw(rest / rest.sum() if float(rest.sum()) > 0 else p)
            break
        if nxt is None:  # every proposal accepted: the target's own next token
            nxt = dist.draw(dist(tl[kk], hist + proposals))
        stats.rounds += 1
        stats.proposed += kk
        stats.accepted += n_acc
        for t in proposals[:n_acc]:
            yield t
            n_out += 1
            if n_out >= max_tokens or t in stop_ids:
                return
        hist += proposals[:n_acc]
        base += 1 + n_acc  # cur and the accepted proposals are now in the target's cache
        target.pos[slot] = base
        target.tokens[slot] = target.tokens[slot][:base]
        # the draft's cache holds cur + proposals[:kk-1]; keep what matches the accepted context
        draft.pos[slot] = min(draft.pos[slot], base)
        draft.tokens[slot] = draft.tokens[slot][:draft.pos[slot]]
        if draft.pos[slot] < base:  # full acceptance: the last proposal never ran through the draft
            draft.forward_seq(proposals[n_acc - 1:n_acc], slot=slot, start=draft.pos[slot])
        cur = nxt


def speculative_events(target: Engine, draft: Engine, req: Request, tokenizer: Any = None,
                       stop_ids: Sequence[int] = (), k: int = 4) -> Iterator[Event]:
    """The generator's events (text, stop strings, finish reasons: a :class:`Seq`) for ``req``
    decoded speculatively, so every front end shows it like any other generation."""
    seq = Seq(req, tokenizer, stop_ids, target.max_len, target.cfg.vocab_size)
    if req.max_tokens <= 0:
        return
    with target.lock, draft.lock:
        yield from seq_events(seq, speculative_generate(target, draft, seq.history, req.max_tokens, k,
                                                        set(stop_ids), params=req.params))
