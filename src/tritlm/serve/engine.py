"""The serving engine: a swappable token generator (``Backend``) behind a bounded worker pool.

``Backend`` is the only thing the server needs from a model runtime: a tokenizer, a context length
and ``generate_stream``, a blocking iterator of token ids. :class:`TorchBackend` runs tritlm's
PyTorch ``Transformer`` (FP or ternary) with its KV cache; a packed CPU engine plugs in by
implementing the same four members.

:class:`Engine` runs each admitted request's ``generate_stream`` on a worker thread (torch releases
the GIL in its kernels, and the event loop must never block on a forward pass), turns ids into text
deltas (incremental detokenisation, stop strings) on that thread, and hands the deltas to the
request's asyncio task. Admission is bounded: at most ``workers`` requests generate and at most
``max_queue`` wait; beyond that :class:`QueueFull` (HTTP 503). Cancelling a job (client gone) frees
its slot at the next token, or at once if it was still waiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

from tritlm.infer.generate import generate_ids
from tritlm.infer.sampling import SamplingParams, apply_repetition_penalty, sample

log = logging.getLogger(__name__)

# (logits over the vocabulary for the next token, ids generated so far) -> adjusted logits.
LogitsProcessor = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


# ---- logit processors -------------------------------------------------------------------------------
class PresenceFrequencyPenalty:
    """OpenAI's penalties: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``.

    ``count`` counts the tokens generated so far (not the prompt), as OpenAI documents. Stateful:
    one instance per request; counts are updated incrementally so each step is O(new tokens).
    """

    def __init__(self, presence: float, frequency: float):
        self.presence = presence
        self.frequency = frequency
        self._counts: torch.Tensor | None = None
        self._seen = 0

    def __call__(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        if self._counts is None or self._counts.numel() != logits.numel() or len(generated) < self._seen:
            self._counts = torch.zeros(logits.numel(), dtype=torch.float32)
            self._seen = 0
        if len(generated) > self._seen:
            new = torch.tensor(list(generated[self._seen:]), dtype=torch.long)
            self._counts.index_add_(0, new, torch.ones(len(new)))
            self._seen = len(generated)
        if self._seen == 0:
            return logits
        c = self._counts
        return logits - c * self.frequency - (c > 0).float() * self.presence


class LogitBias:
    """OpenAI's ``logit_bias``: add a fixed bias to chosen token ids (-100 bans, +100 forces)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        out = logits.clone()
        out[self.ids] += self.values
        return out


# ---- backends ---------------------------------------------------------------------------------------
@runtime_checkable
class Backend(Protocol):
    """What the server needs from an inference runtime."""

    tokenizer: Any  # encode(str) -> list[int], decode(ids) -> str, eos_id, bos_id, vocab_size
    context_length: int
    vocab_size: int  # ids a prompt may hold: [0, vocab_size)

    def generate_stream(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                        stop_ids: frozenset[int], processors: Sequence[LogitsProcessor] = ()
                        ) -> Iterator[int]:
        """Yield up to ``max_tokens`` new ids, ending after yielding one in ``stop_ids``.

        Blocking; runs on a worker thread; each call must own its KV cache (calls run concurrently
        when the engine has several workers). Closing the iterator must free its resources.
        """
        ...


class TorchBackend:
    """tritlm's PyTorch ``Transformer`` with its KV cache (FP twin or ternary alike)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context_length = int(model.cfg.max_seq_len)
        self.vocab_size = int(model.cfg.vocab_size)

    @classmethod
    def from_loaded(cls, m: Any) -> TorchBackend:
        return cls(m.model, m.tokenizer)

    @torch.no_grad()
    def generate_stream(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                        stop_ids: frozenset[int], processors: Sequence[LogitsProcessor] = ()
                        ) -> Iterator[int]:
        return generate_ids(self.model, list(prompt_ids)[-self.context_length:], max_tokens, params,
                            stop_ids, processors)


class PackedBackend:
    """The packed CPU runtime (``tritlm.infer.engine.Engine``, ``tritlm.load`` of a packed folder).

    That engine owns one KV cache guarded by its lock, so generations run one at a time whatever
    the number of workers (a waiting worker blocks on the lock); it also reuses the cached prefix of
    the previous request (a chat's history). Logit processors go through its ``sampler`` hook.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.context_length = int(engine.max_len)
        self.vocab_size = int(engine.cfg.vocab_size)

    def generate_stream(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                        stop_ids: frozenset[int], processors: Sequence[LogitsProcessor] = ()
                        ) -> Iterator[int]:
        sampler = None
        if processors:
            n_prompt = min(len(prompt_ids), self.context_length)  # the engine keeps the prompt's tail
            gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
            base = replace(params, repetition_penalty=1.0)

            def sampler(logits: torch.Tensor, history: torch.Tensor) -> int:
                lg = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
                done = history[n_prompt:].tolist()
                for proc in processors:
                    lg = proc(lg, done)
                return sample(lg, base, None, gen)

        with self.engine.lock:  # held across yields, on the one worker thread that runs this generator
            yield from self.engine.generate(list(prompt_ids), max_tokens, params, set(stop_ids), sampler=sampler)


def backend_for(loaded: Any) -> Backend:
    """The backend for a :class:`tritlm.api.LoadedModel` (training checkpoint or packed folder)."""
    if getattr(loaded, "engine", None) is not None:
        return PackedBackend(loaded.engine)
    return TorchBackend.from_loaded(loaded)


# ---- text -------------------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Text deltas from a growing list of ids, correct for byte-level BPE and SentencePiece.

    Decoding one token at a time is wrong for both: a multi-byte character can span tokens, and
    SentencePiece drops a word's leading space at the start of a decode. So each step decodes a
    short window with some context before the new tokens and emits the difference, holding back
    text that ends in U+FFFD (an incomplete character) until the next token completes it
    (the method of Hugging Face text-generation-inference).
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, tid: int) -> str:
        self.ids.append(tid)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD)."""
        if self.read >= len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        p, self.pending = self.pending, ""
        return p


# ---- jobs and the engine ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    lstrip: bool = False  # drop leading whitespace of the output (chat templates ending in "Assistant:")

    def processors(self) -> list[LogitsProcessor]:
        procs: list[LogitsProcessor] = []
        if self.presence_penalty or self.frequency_penalty:
            procs.append(PresenceFrequencyPenalty(self.presence_penalty, self.frequency_penalty))
        if self.logit_bias:
            procs.append(LogitBias(self.logit_bias))
        return procs


@dataclass
class Delta:
    text: str


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class QueueFull(Exception):
    pass


class Job:
    """One admitted request: cancel it, or iterate its events from the event loop."""

    def __init__(self, engine: Engine, req: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.req = req
        self.loop = loop
        self.queue: asyncio.Queue[Delta | Finish] = asyncio.Queue()
        self.state = "waiting"  # -> running -> done, guarded by engine._lock
        self.cancelled = threading.Event()
        self.t_submit = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating (idempotent): a waiting job leaves the queue now, a running one at its next token."""
        self.cancelled.set()
        self.engine._dequeue_if_waiting(self)

    def _emit(self, item: Delta | Finish) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    async def events(self, poll: Callable[[], Awaitable[bool]] | None = None,
                     poll_interval: float = 1.0) -> AsyncIterator[Delta | Finish]:
        """Deltas then one Finish. ``poll()`` returning True (e.g. client disconnected) cancels."""
        try:
            while True:
                if poll is None:
                    item = await self.queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(self.queue.get(), poll_interval)
                    except asyncio.TimeoutError:
                        if await poll():
                            self.cancel()
                            return
                        continue
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            self.cancel()  # no-op when finished; frees the slot when the consumer went away


class Engine:
    def __init__(self, backend: Backend, workers: int = 1, max_queue: int = 64, metrics: Any = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.backend = backend
        self.workers = workers
        self.max_queue = max_queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._jobs: set[Job] = set()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tritlm-gen")
        self._eos = frozenset({backend.tokenizer.eos_id}) if backend.tokenizer.eos_id is not None else frozenset()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Admit a request or raise :class:`QueueFull`."""
        job = Job(self, req, loop or asyncio.get_running_loop())
        with self._lock:
            if self._waiting + self._running >= self.workers + self.max_queue:
                if self.metrics is not None:
                    self.metrics.observe_rejected()
                raise QueueFull(f"{self._running} requests generating and {self._waiting} waiting "
                                f"(max queue {self.max_queue}); retry later")
            self._waiting += 1
            self._jobs.add(job)
        self._pool.submit(self._run, job)
        return job

    def _dequeue_if_waiting(self, job: Job) -> None:
        with self._lock:
            if job.state == "waiting":
                job.state = "done"
                self._waiting -= 1
                self._jobs.discard(job)
                finish = Finish("cancelled", len(job.req.prompt_ids), 0)
            else:
                return
        job._emit(finish)

    def _run(self, job: Job) -> None:
        with self._lock:
            if job.state != "waiting":
                return  # cancelled while queued
            job.state = "running"
            self._waiting -= 1
            self._running += 1
        req = job.req
        n = 0
        reason = "length"
        err: str | None = None
        ttft: float | None = None
        detok = IncrementalDetokenizer(self.backend.tokenizer, req.prompt_ids)
        stopper = StopMatcher(req.stop)
        lstrip = req.lstrip
        it: Iterator[int] | None = None

        def emit(text: str) -> None:
            nonlocal lstrip
            if lstrip:
                text = text.lstrip()
                lstrip = not text
            if text:
                job._emit(Delta(text))

        try:
            it = self.backend.generate_stream(req.prompt_ids, req.max_tokens, req.sampling, self._eos,
                                              req.processors())
            for tid in it:
                if ttft is None:
                    ttft = time.perf_counter() - job.t_submit
                n += 1
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                if tid in self._eos:
                    reason = "stop"
                    emit(stopper.feed(detok.flush())[0] + stopper.flush())
                    break
                text, hit = stopper.feed(detok.add(tid))
                emit(text)
                if hit:
                    reason = "stop"
                    break
            else:
                if n < req.max_tokens:
                    reason = "stop"  # the backend ended early (its own stop condition)
                text, hit = stopper.feed(detok.flush())
                emit(text if hit else text + stopper.flush())
                if hit:
                    reason = "stop"
        except Exception as e:
            log.exception("generation failed")
            reason, err = "error", f"{type(e).__name__}: {e}"
        finally:
            if it is not None and hasattr(it, "close"):
                it.close()  # frees the KV cache now rather than at garbage collection
            with self._lock:
                job.state = "done"
                self._running -= 1
                self._jobs.discard(job)
            if self.metrics is not None:
                self.metrics.observe_generation(len(req.prompt_ids), n, reason, ttft)
            job._emit(Finish(reason, len(req.prompt_ids), n, err))

    def shutdown(self) -> None:
        with self._lock:
            jobs = list(self._jobs)
        for j in jobs:
            j.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
