"""Autoregressive generation with the KV cache, for the training model (eval forward)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import torch

from tritlm.infer.sampling import SamplingParams, apply_repetition_penalty, sample
from tritlm.model.transformer import Transformer


@torch.no_grad()
def generate_ids(model: Transformer, prompt: list[int], max_tokens: int, params: SamplingParams,
                 stop_ids: set[int] | frozenset[int] | None = None,
                 processors: Sequence[Callable[[torch.Tensor, list[int]], torch.Tensor]] = ()
                 ) -> Iterator[int]:
    """Yield new token ids one at a time: one prefill pass, then one cached step per token.

    A prompt longer than the model's context keeps its last tokens. ``processors`` (e.g. the
    server's frequency/presence penalties) see the logits after the repetition penalty and the
    tokens generated so far, in llama.cpp's order; temperature and the filters come after them.
    """
    model.eval()
    ctx = model.cfg.max_seq_len
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    prompt = prompt[-ctx:]
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    device = model.embed_tokens.weight.device
    cache = model.new_cache(1, ctx)
    history = torch.tensor(prompt, dtype=torch.long)
    base = replace(params, repetition_penalty=1.0)  # applied before the processors instead
    generated: list[int] = []
    logits, _ = model(history.view(1, -1).to(device), cache=cache, last_only=True)
    for _ in range(max_tokens):
        if processors:
            lg = apply_repetition_penalty(logits[0, -1].float().cpu(), history, params.repetition_penalty)
            for proc in processors:
                lg = proc(lg, generated)
            nxt = sample(lg, base, None, gen)
        else:
            nxt = sample(logits[0, -1], params, history, gen)
        yield nxt
        if stop_ids and nxt in stop_ids:
            return
        generated.append(nxt)
        history = torch.cat([history, torch.tensor([nxt])])
        if cache.pos >= ctx:  # context full: restart the cache on the most recent tokens
            cache.reset()
            keep = history[-(ctx // 2):]
            logits, _ = model(keep.view(1, -1).to(device), cache=cache, last_only=True)
        else:
            logits, _ = model(torch.tensor([[nxt]], device=device), cache=cache)
