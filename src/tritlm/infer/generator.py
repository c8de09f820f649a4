"""The one generation path: a step-level generator over any runtime (``infer/runtimes.py``).

Each sequence (:class:`Seq`) carries all of its own state: the :class:`~tritlm.infer.sampling.Sampler`
(seeded RNG, penalties over its own generated tokens, logit bias, mirostat's ``mu``,
must-include), incremental detokenisation, the stop-string matcher and its token budget.
:class:`Generator` holds several sequences in the runtime's slots; each :meth:`Generator.step`
admits waiting sequences (their prefill), samples one token for every running sequence and
decodes all that continue in one batched forward. The Python API, ``tritlm generate``,
``tritlm chat`` and the server all run this loop, so one request (prompt, seed, sampler
settings) gives the same tokens through any of them, and on any runtime.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tritlm.errors import ConfigError
from tritlm.infer.runtimes import Runtime
from tritlm.infer.sampling import Sampler, SamplingParams, sample_batch
from tritlm.infer.text import IncrementalDetokenizer, StopStrings


@dataclass(frozen=True)
class Request:
    prompt_ids: Sequence[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    lstrip: bool = False  # drop whitespace before the reply's first character (templates ending in "Assistant:")
    # > 0: contrastive search over the params.top_k likeliest tokens instead of sampling (a runtime
    # with a ``contrastive`` method: the packed engine); the sequence then steps outside the batch
    penalty_alpha: float = 0.0


@dataclass
class Event:
    """What one step did for one sequence: the token it sampled (None when it ended without one),
    the text that token made safe to show, and why it finished, if it did."""

    seq: Seq
    token: int | None
    text: str
    finish: str | None = None  # "stop" (EOS / stop string) | "length" | "error"
    error: str | None = None
    exc: BaseException | None = None  # what failed, for callers that re-raise it


class Seq:
    """One sequence's generation state (see the module docstring)."""

    def __init__(self, req: Request, tokenizer: Any, stop_ids: Iterable[int], context: int, vocab: int):
        prompt = list(req.prompt_ids)[-context:]  # a prompt longer than the context keeps its tail
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        _check_vocab(prompt, req.params, vocab)
        self.req = req
        self.max_tokens = req.max_tokens
        self.stop_ids = frozenset(stop_ids)
        self.history = prompt
        self.prompt_len = len(prompt)
        self.sampler = Sampler(req.params, prompt_len=len(prompt), stop_ids=set(self.stop_ids),
                               max_tokens=req.max_tokens)
        self.detok = IncrementalDetokenizer(tokenizer, prompt) if tokenizer is not None else None
        self.stops = StopStrings(req.params.stop if tokenizer is not None else ())
        self._lstrip = req.lstrip
        self.n = 0  # tokens sampled (an EOS or the tokens of a stop string included)
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens in the slot so far (a long prompt prefills in chunks)
        self.driver: Iterator[int] | None = None  # tokens of another decoding algorithm (contrastive)
        self.logits: torch.Tensor | None = None  # the next token's, once the whole prompt is in
        self.finish: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.history[self.prompt_len:]

    def _emit(self, text: str) -> str:
        if self._lstrip and text:
            text = text.lstrip()
            self._lstrip = not text
        return text

    def _end(self, token: int | None, text: str, reason: str, exc: BaseException | None = None) -> Event:
        self.finish = reason
        err = None if exc is None else f"{type(exc).__name__}: {exc}"
        return Event(self, token, self._emit(text), reason, err, exc)

    def take(self, tok: int) -> Event:
        """Account for the sampled token ``tok``: its text, and whether the sequence ends here."""
        self.n += 1
        self.history.append(tok)
        if self.detok is None:
            if tok in self.stop_ids:
                return self._end(tok, "", "stop")
            return self._end(tok, "", "length") if self.n >= self.max_tokens else Event(self, tok, "")
        if tok in self.stop_ids:
            text = self.stops.feed(self.detok.flush())[0]
            return self._end(tok, text + self.stops.flush(), "stop")
        text, hit = self.stops.feed(self.detok.add(tok))
        if hit:
            return self._end(tok, text, "stop")
        if self.n >= self.max_tokens:
            tail, hit = self.stops.feed(self.detok.flush())
            return self._end(tok, text + tail + ("" if hit else self.stops.flush()), "stop" if hit else "length")
        return Event(self, tok, self._emit(text))


def _check_vocab(prompt: list[int], p: SamplingParams, vocab: int) -> None:
    bad = next((t for t in prompt if not 0 <= int(t) < vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab}")
    named = {"banned_tokens": p.banned_tokens, "must_include": p.must_include,
             "allowed_tokens": p.allowed_tokens or (), "logit_bias": [k for k, _ in p.logit_bias],
             "banned_sequences": [t for s in p.banned_sequences for t in s]}
    for name, ids in named.items():
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise ConfigError(f"sampling: {name} holds token id {bad}, outside the model's vocabulary of {vocab}")


class Generator:
    """Sequences in a runtime's slots, stepped together (continuous batching).

    ``add`` queues a sequence; ``step`` admits queued ones into free slots (prefill), samples one
    token for each running one and decodes those that continue in one forward. ``cancel`` frees
    a slot at once. ``prefill_chunk``: at most this many prompt tokens are prefilled per step, so
    a long prompt joining the batch delays the others' next token by one chunk, not by the whole
    prompt (None: whole prompts). Not thread-safe: one thread drives it.
    """

    def __init__(self, runtime: Runtime, tokenizer: Any = None, stop_ids: Iterable[int] = (),
                 max_batch: int | None = None, slots: Sequence[int] | None = None,
                 prefill_chunk: int | None = None):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk
        self.rt = runtime
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        # which of the runtime's slots this generator may use: the given ones, or the first max_batch,
        # reserved as concurrency grows (doubling) so a runtime's cache grows only as far as it is used
        if slots is not None:
            self._free, self.max_batch = sorted(slots), len(slots)
            self._reserved = self.max_batch
        else:
            self.max_batch = min(max_batch or runtime.slots, runtime.slots)
            self._free, self._reserved = [], 0
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._pending: list[Seq] = []  # sampled last step, their tokens not yet through the model

    def add(self, req: Request) -> Seq:
        """Queue ``req``; bad input (empty prompt, ids outside the vocabulary) raises here."""
        seq = Seq(req, self.tokenizer, self.stop_ids, self.rt.context_length, self.rt.vocab_size)
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Seq) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self._release(seq)
        seq.finish = seq.finish or "cancelled"

    def _release(self, seq: Seq) -> None:
        self.running.remove(seq)
        if seq.slot is not None:
            self.rt.release(seq.slot)
            self._free.append(seq.slot)
            self._free.sort()  # lowest slot first: a lone sequence always lands in slot 0 (its cached prefix)
            seq.slot = None
        seq.logits = None
        if seq.driver is not None:
            close = getattr(seq.driver, "close", None)
            if close is not None:
                close()
            seq.driver = None

    def _has_slot(self) -> bool:
        if not self._free and self._reserved < self.max_batch:
            got = min(self.rt.reserve(min(self.max_batch, max(1, 2 * self._reserved))), self.max_batch)
            self._free.extend(range(self._reserved, got))
            self._reserved = max(self._reserved, got)
        return bool(self._free)

    def _admit(self, pending: list[Seq] | None = None) -> list[Event]:
        """Waiting sequences into free slots and their prompts' prefill; ``pending``: sequences
        whose sampled token still has to go through the model, in the same forward as the
        prompts where the runtime can (``step_many``), else first."""
        events = []
        while self.waiting and self._has_slot():
            seq = self.waiting.popleft()
            if seq.max_tokens <= 0:
                events.append(seq._end(None, "", "length"))
                continue
            seq.slot = self._free.pop(0)
            self.running.append(seq)
            if seq.req.penalty_alpha:
                contrastive = getattr(self.rt, "contrastive", None)
                if contrastive is None:
                    self._release(seq)
                    events.append(seq._end(None, "", "error", ConfigError(
                        "contrastive search (penalty_alpha) needs a packed model")))
                    continue
                seq.driver = contrastive(seq.history, seq.slot, seq.max_tokens, seq.req.params.top_k,
                                         seq.req.penalty_alpha, self.stop_ids)
        budget = self.prefill_chunk
        todo: list[tuple[Seq, int]] = []  # (sequence, prompt tokens through after this step)
        for seq in [s for s in self.running if s.logits is None and s.driver is None]:
            if budget is not None and budget <= 0:
                break
            n = len(seq.history)
            end = n if budget is None else min(n, seq.prefilled + budget)
            todo.append((seq, end))
            if budget is not None:
                budget -= end - seq.prefilled
        prompts = [(seq.history[:end], seq.slot) for seq, end in todo]
        got: list | None = None
        pending = self._decode_ready(pending or [])
        mixed = getattr(self.rt, "step_many", None)
        if pending and todo and mixed is not None:
            try:  # the running sequences' next tokens and the new prompts: one forward
                dec, got = mixed([(q.history[-1], q.slot) for q in pending], prompts)
            except Exception:  # noqa: BLE001 - apart below: a failing decode raises, a failing prompt fails alone
                got = None
            else:
                for i, q in enumerate(pending):
                    q.logits = dec[i]
                pending = []
        if pending:
            self._decode_batch(pending)
        many = getattr(self.rt, "prefill_many", None)
        if got is None and many is not None and len(todo) > 1:
            try:  # requests that arrived together: one forward for all their prompts
                got = many(prompts)
            except Exception:  # noqa: BLE001 - one by one below, so only a failing prompt fails
                got = None
        for i, (seq, end) in enumerate(todo):
            if got is not None:
                logits = got[i]
            else:
                try:
                    logits = self.rt.prefill(seq.history[:end], seq.slot)
                except Exception as e:  # noqa: BLE001 - this sequence fails, the others go on
                    self._release(seq)
                    events.append(seq._end(None, "", "error", e))
                    continue
            seq.prefilled = end
            if end == len(seq.history):
                seq.logits = logits
        return events

    def step(self) -> list[Event]:
        """Admit (prefill), then one token for every sequence whose prompt is in. A failed decode
        forward raises.

        The decode forward of the tokens sampled here runs at the start of the next step, so
        that the tokens reach the caller (a server streaming them) one forward sooner, and a new
        request's first token does not wait for the batch's forward."""
        with self.rt.step_scope():
            return self._step()

    def _step(self) -> list[Event]:
        pending, self._pending = self._pending, []
        events = self._admit([s for s in pending if s.slot is not None and s in self.running])
        cont: list[Seq] = []
        for seq in [s for s in self.running if s.driver is not None]:  # their own forwards, one token each
            try:
                ev = seq.take(next(seq.driver))
            except Exception as e:  # noqa: BLE001 - e.g. a setting contrastive search refuses; the batch goes on
                ev = seq._end(None, "", "error", e)
            events.append(ev)
            if ev.finish:
                self._release(seq)
        ready = [s for s in self.running if s.logits is not None]
        plain = [s for s in ready if s.sampler.plain]
        drawn = dict(zip(plain, sample_batch([s.sampler for s in plain], [s.logits for s in plain])))
        for seq in ready:
            tok = drawn[seq] if seq in drawn else seq.sampler(seq.logits, torch.tensor(seq.history, dtype=torch.long))
            ev = seq.take(tok)
            events.append(ev)
            if ev.finish:
                self._release(seq)
            else:
                cont.append(seq)
        self._pending = cont
        return events

    def _decode_ready(self, seqs: list[Seq]) -> list[Seq]:
        """``seqs`` whose slot has room for one more token; a full one restarts on the most recent
        half of its history (its logits set here)."""
        ctx = self.rt.context_length
        batch = []
        for seq in seqs:
            if self.rt.filled(seq.slot) >= ctx:
                seq.logits = self.rt.prefill(seq.history[-(ctx // 2):], seq.slot)
            else:
                batch.append(seq)
        return batch

    def _decode_batch(self, batch: list[Seq]) -> None:
        logits = self.rt.decode([s.history[-1] for s in batch], [s.slot for s in batch])
        for i, seq in enumerate(batch):
            seq.logits = logits[i]

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> Iterator[Event]:
        """Step until every sequence has finished; closing the iterator cancels what is left."""
        try:
            while not self.idle:
                yield from self.step()
        finally:
            for seq in list(self.waiting) + list(self.running):
                self.cancel(seq)


def seq_events(seq: Seq, tokens: Iterator[int]) -> Iterator[Event]:
    """The events of ``seq`` (text, stop strings, finish) for tokens chosen by another decoding
    algorithm (speculative decoding, contrastive search); closes ``tokens`` when ``seq`` ends."""
    try:
        for tok in tokens:
            ev = seq.take(tok)
            yield ev
            if ev.finish:
                return
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


def generate(runtime: Runtime, requests: Sequence[Request], tokenizer: Any = None, stop_ids: Iterable[int] = (),
             max_batch: int | None = None, slots: Sequence[int] | None = None,
             prefill_chunk: int | None = None) -> Iterator[Event]:
    """Run ``requests`` to the end (several at once when the runtime has the slots), yielding
    every event; ``event.seq.req`` tells which request it belongs to."""
    gen = Generator(runtime, tokenizer, stop_ids, max_batch, slots, prefill_chunk)
    for r in requests:
        gen.add(r)
    return gen.run()
