"""Decode steps of the GPU runtime replayed from CUDA graphs.

A decode step of a small model on a GPU is a few hundred kernel launches of microseconds each:
launch overhead, not the weights, sets its time. A CUDA graph records the step once and replays
it with one launch. A graph is recorded for a fixed shape and fixed addresses, so the step here
reads everything that changes from static device tensors (token ids, slots, positions) and writes
the new keys/values with index_put at those positions, instead of the Python slicing of
:class:`~tritlm.model.kv_cache.SlotCache`.

Attention then reads a fixed window of each slot's cache: the first ``bucket`` positions, with
a mask for the positions past each row's own. One graph per (batch size, first slot, bucket):
buckets of ``BUCKET`` positions keep the extra keys read to less than one bucket, and the batch
must occupy consecutive slots (what the scheduler hands out first) so the window is a view, not
a gather of the whole cache. Anything else runs eagerly.

``capture=False`` runs the same static step without recording it: the CPU tests check its
math against the engine's own step, which is all of the graph but the recording.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)

BUCKET = 256


class StaticSlotCache:
    """The transformer's cache protocol over ``rows`` consecutive slots from ``first``, with the
    positions in a device tensor (``pos``, one per row) and a window of ``length`` positions."""

    static = True  # the forward skips its host-side position check (the engine checked them)

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], first: int, rows: int, length: int,
                 pos: torch.Tensor):
        self.k, self.v = k, v
        self.first, self.rows, self.length = first, rows, length
        self.pos = pos  # [rows] long, on the cache's device
        self.row_idx = torch.arange(first, first + rows, device=pos.device)
        self.window = torch.arange(length, device=pos.device)

    def positions(self, b: int, t: int) -> torch.Tensor:
        return self.pos.view(-1, 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.k[layer], self.v[layer]
        kc[self.row_idx, :, self.pos] = k[:, :, 0]
        vc[self.row_idx, :, self.pos] = v[:, :, 0]
        a, n = self.first, self.length
        mask = (self.window.view(1, -1) <= self.pos.view(-1, 1)).view(self.rows, 1, 1, n)
        return kc[a:a + self.rows, :, :n], vc[a:a + self.rows, :, :n], mask

    def advance(self, t: int) -> None:
        pass


class _Step:
    """One recorded (or, without capture, re-run) decode step of a fixed shape."""

    def __init__(self, engine, first: int, rows: int, length: int, capture: bool):
        dev = engine.device
        self.model = engine.model
        self.idx = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(rows, dtype=torch.long, device=dev)
        self.cache = StaticSlotCache(engine.k_cache, engine.v_cache, first, rows, length, self.pos)
        self.graph = None
        self.out: torch.Tensor | None = None
        self.capture = capture

    def _run(self) -> torch.Tensor:
        return self.model(self.idx, cache=self.cache)[0][:, 0]

    def __call__(self, tokens: Sequence[int], pos: Sequence[int]) -> torch.Tensor:
        self.idx.copy_(torch.as_tensor(list(tokens), dtype=torch.long).view(-1, 1), non_blocking=True)
        self.pos.copy_(torch.as_tensor(list(pos), dtype=torch.long), non_blocking=True)
        if not self.capture:
            return self._run()
        if self.graph is None:
            # warm-up on a side stream (compiles the Triton kernels, settles the allocator), then
            # record; the warm-up computes this very step, so its K/V writes are the right ones
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._run()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.out = self._run()
            self.graph = g
        self.graph.replay()
        return self.out


class GraphDecoder:
    """Decode steps for an engine on CUDA, one recorded graph per (rows, first slot, bucket)."""

    def __init__(self, engine, capture: bool = True, bucket: int = BUCKET, max_graphs: int = 64):
        self.engine = engine
        self.capture = capture
        self.bucket = bucket
        self.max_graphs = max_graphs
        self.steps: dict[tuple[int, int, int], _Step] = {}
        self.failed = False

    def usable(self, slots: Sequence[int]) -> bool:
        """Whether a step over ``slots`` can take a graph (consecutive slots, no earlier failure)."""
        s = list(slots)
        return not self.failed and s == list(range(s[0], s[0] + len(s)))

    def step(self, tokens: Sequence[int], slots: Sequence[int], pos: Sequence[int]) -> torch.Tensor | None:
        """Logits ``[B, V]`` on the device, or None when this step must run eagerly."""
        if not self.usable(slots):
            return None
        e = self.engine
        length = min(e.cache_len, (max(pos) // self.bucket + 1) * self.bucket)
        key = (len(slots), slots[0], length)
        st = self.steps.get(key)
        if st is None:
            if len(self.steps) >= self.max_graphs:
                self.reset()
            st = self.steps[key] = _Step(e, slots[0], len(slots), length, self.capture)
        try:
            return st(tokens, pos)
        except RuntimeError as err:  # a capture this torch / driver refuses: stay eager from now on
            if not self.capture:
                raise
            log.warning("CUDA graph capture failed (%s); decoding eagerly", err)
            self.failed = True
            self.steps.clear()
            return None

    def reset(self) -> None:
        """Drop every recorded graph (the cache tensors were replaced: ``Engine._regrow``)."""
        self.steps.clear()
