"""The serving engine: every admitted request is a sequence of one shared generator
(``infer/generator.py``), stepped by one scheduler thread (continuous batching).

A :class:`Backend` is a model runtime (``infer/runtimes.py``: the PyTorch ``Transformer`` or the
packed CPU engine) with its tokenizer. Admission is bounded: at most ``max_batch`` requests run,
each in its own slot of the runtime's KV cache, and at most ``max_queue`` wait; beyond that
:class:`QueueFull` (HTTP 503). Each step the scheduler admits waiting requests into free slots
(their prefill, at most ``PREFILL_CHUNK`` prompt tokens a step so a long prompt does not stall the
others), samples one token for every running sequence, decodes them all in one batched forward,
and hands the text deltas (incremental detokenisation and stop strings happen in the generator, as
for every front end) to each request's asyncio task. Cancelling a job (client gone)
frees its slot before the next step, or at once if it was still waiting. The event loop never
blocks on a forward pass: the scheduler runs on its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tritlm.infer.generator import Event, Generator, Request, Seq
from tritlm.infer.runtimes import Runtime, runtime_for

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
PREFILL_CHUNK = 256  # prompt tokens prefilled per step: a long prompt stalls the batch one chunk at a time


@dataclass
class Backend:
    """What the server needs from a model: a runtime with enough slots, and its tokenizer."""

    runtime: Runtime
    tokenizer: Any  # encode(str) -> list[int], decode(ids) -> str, eos_id, bos_id

    @property
    def context_length(self) -> int:
        return self.runtime.context_length

    @property
    def vocab_size(self) -> int:  # ids a prompt may hold: [0, vocab_size)
        return self.runtime.vocab_size


def backend_for(loaded: Any, max_batch: int = DEFAULT_MAX_BATCH, prefix_cache_mb: int = 0) -> Backend:
    """The backend for a :class:`tritlm.api.LoadedModel` (training checkpoint or packed folder).

    A packed model's engine grows up to ``max_batch`` cache slots as concurrency asks, and belongs
    to the server: a generation through the same ``LoadedModel`` meanwhile would share its slots.
    ``prefix_cache_mb``: K/V of earlier prompts kept for reuse by prompts sharing their prefix
    (packed models; see ``infer/prefix_cache.py``)."""
    return Backend(runtime_for(loaded, max_batch, prefix_cache_mb << 20), loaded.tokenizer)


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

    def __init__(self, engine: Engine, req: Request, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.req = req
        self.loop = loop
        self.queue: asyncio.Queue[Delta | Finish] = asyncio.Queue()
        self.state = "waiting"  # -> running -> done, guarded by engine._cv
        self.cancelled = threading.Event()
        self.t_submit = time.perf_counter()
        self.ttft: float | None = None
        self.seq: Seq | None = None

    def cancel(self) -> None:
        """Stop generating (idempotent): a waiting job leaves the queue now, a running one frees
        its slot before the next step."""
        self.cancelled.set()
        self.engine._dequeue_if_waiting(self)

    def _emit(self, item: Delta | Finish) -> None:
        _emit_all([(self, item)])

    async def events(self, poll: Callable[[], Awaitable[bool]] | None = None,
                     poll_interval: float = 1.0) -> AsyncIterator[Delta | Finish]:
        """Deltas then one Finish. ``poll()`` returning True (e.g. client disconnected) cancels;
        it runs after every delta and every ``poll_interval`` seconds without one, so a client
        that left stops its generation at the next token, streaming or not."""
        try:
            while True:
                if poll is None:
                    item = await self.queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(self.queue.get(), poll_interval)
                    except asyncio.TimeoutError:
                        item = None
                    if not isinstance(item, Finish) and await poll():
                        self.cancel()
                        return
                    if item is None:
                        continue
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            self.cancel()  # no-op when finished; frees the slot when the consumer went away



def _put_all(items: list[tuple[Job, Delta | Finish]]) -> None:
    for job, item in items:
        job.queue.put_nowait(item)


def _emit_all(items: list[tuple[Job, Delta | Finish]]) -> None:
    """Hand a step's items to their event loops: one wake-up per loop and step, not per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Delta | Finish]]] = {}
    for job, item in items:
        by_loop.setdefault(job.loop, []).append((job, item))
    for loop, its in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, its)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            for job, _ in its:
                job.cancelled.set()

class Engine:
    """The scheduler (see the module docstring). ``max_batch``: sequences decoded together."""

    def __init__(self, backend: Backend, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = 64,
                 metrics: Any = None, prefill_chunk: int | None = PREFILL_CHUNK,
                 speculative: Callable[[Request], Iterator[Event]] | None = None):
        if speculative is not None:
            # speculation replaces batching: the target verifies one sequence's k proposals in one
            # forward, so requests run one at a time (latency at low concurrency is what it is for)
            max_batch = 1
        self.speculative = speculative
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.backend = backend
        # every slot up front: growing the cache while requests run stalls the batch (allocation
        # and copy). Its length still grows with the longest sequence (Engine.ensure_len), each
        # next length allocated on a background thread before it is needed (GrowAhead)
        backend.runtime.reserve(max_batch)
        eos = backend.tokenizer.eos_id
        self.gen = Generator(backend.runtime, backend.tokenizer, () if eos is None else (eos,), max_batch,
                             prefill_chunk=prefill_chunk)
        self.max_batch = self.gen.max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self._jobs: dict[Seq, Job] = {}  # running, by sequence
        self._running = 0  # admitted and not finished (guarded by _cv)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tritlm-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    def submit(self, req: Request, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Admit a request or raise :class:`QueueFull`."""
        job = Job(self, req, loop or asyncio.get_running_loop())
        with self._cv:
            if self._stopping or len(self._pending) + self._running >= self.max_batch + self.max_queue:
                if self.metrics is not None:
                    self.metrics.observe_rejected()
                raise QueueFull(f"{self._running} requests generating and {len(self._pending)} waiting "
                                f"(max queue {self.max_queue}); retry later")
            self._pending.append(job)
            self._cv.notify()
        return job

    def _dequeue_if_waiting(self, job: Job) -> None:
        with self._cv:
            if job.state != "waiting":
                return
            self._pending.remove(job)
            job.state = "done"
        job._emit(Finish("cancelled", len(job.req.prompt_ids), 0))

    def _finish(self, job: Job, reason: str, n: int, err: str | None = None,
                out: list[tuple[Job, Delta | Finish]] | None = None) -> None:
        with self._cv:
            if job.state == "done":
                return
            job.state = "done"
            self._running -= 1
            if job.seq is not None:
                self._jobs.pop(job.seq, None)
        if self.metrics is not None:
            self.metrics.observe_generation(len(job.req.prompt_ids), n, reason, job.ttft)
        item = Finish(reason, len(job.req.prompt_ids), n, err)
        if out is None:
            job._emit(item)
        else:
            out.append((job, item))

    def _admit(self) -> list[Job] | None:
        """Under the lock: wait for work, move waiting jobs into free slots; None to stop."""
        with self._cv:
            while not self._stopping and not self._pending and not self._jobs:
                self._cv.wait()
            if self._stopping:
                return None
            admitted = []
            while self._pending and self._running < self.max_batch:
                job = self._pending.popleft()
                job.state = "running"
                self._running += 1
                admitted.append(job)
            return admitted

    def _loop_speculative(self) -> None:
        """One request at a time through the speculative decoder (``infer/speculative.py``),
        checking for cancellation between tokens."""
        while (admitted := self._admit()) is not None:
            for job in admitted:
                n, finished = 0, False
                try:
                    it = self.speculative(job.req)
                    for ev in it:
                        if job.cancelled.is_set():
                            break
                        if ev.token is not None:
                            n += 1
                            if job.ttft is None:
                                job.ttft = time.perf_counter() - job.t_submit
                        if ev.text:
                            job._emit(Delta(ev.text))
                        if ev.finish:
                            self._finish(job, ev.finish, n, ev.error)
                            finished = True
                            break
                    it.close()
                except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
                    log.exception("speculative generation failed")
                    self._finish(job, "error", n, f"{type(e).__name__}: {e}")
                    continue
                if not finished:
                    self._finish(job, "cancelled" if job.cancelled.is_set() else "length", n)

    def _loop(self) -> None:
        if self.speculative is not None:
            self._loop_speculative()
            return
        while (admitted := self._admit()) is not None:
            for job in admitted:
                try:
                    job.seq = self.gen.add(job.req)
                except Exception as e:  # noqa: BLE001 - e.g. a sampler setting the model cannot take
                    self._finish(job, "error", 0, f"{type(e).__name__}: {e}")
                    continue
                with self._cv:
                    self._jobs[job.seq] = job
            for seq, job in list(self._jobs.items()):
                if job.cancelled.is_set():
                    self.gen.cancel(seq)
                    self._finish(job, "cancelled", seq.n)
            if not self._jobs:
                continue
            try:
                events = self.gen.step()
            except Exception as e:  # a failed forward: every sequence in it fails, the server goes on
                log.exception("generation failed")
                for seq, job in list(self._jobs.items()):
                    self.gen.cancel(seq)
                    self._finish(job, "error", seq.n, f"{type(e).__name__}: {e}")
                continue
            now = time.perf_counter()
            out: list[tuple[Job, Delta | Finish]] = []
            for ev in events:
                job = self._jobs.get(ev.seq)
                if job is None:
                    continue
                if job.ttft is None and ev.token is not None:
                    job.ttft = now - job.t_submit
                if ev.text:
                    out.append((job, Delta(ev.text)))
                if ev.finish:
                    self._finish(job, ev.finish, ev.seq.n, ev.error, out)
            _emit_all(out)
        for seq, job in list(self._jobs.items()):  # shutting down
            self.gen.cancel(seq)
            self._finish(job, "cancelled", seq.n)

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            for job in pending:
                job.state = "done"
            self._cv.notify_all()
        for job in pending:
            job._emit(Finish("cancelled", len(job.req.prompt_ids), 0))
        self._thread.join(timeout=30)
