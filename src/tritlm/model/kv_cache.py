"""Preallocated key/value caches for incremental decoding: :class:`KVCache` (a batch at one fill
level) and :class:`SlotCache` (sequence slots, each at its own position: what the runtimes batch).
"""

from __future__ import annotations

import ctypes
import math
import threading

import torch

from tritlm.hugepages import huge_empty

_ZERO_CHUNK = 64 << 20  # bytes zeroed between looks at a stop request
# set as the interpreter exits, before it joins the threads still running (GrowAhead's)
_EXITING = threading.Event()
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_EXITING.set)


class _Stopped(Exception):
    pass


def cache_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu",
                stop: threading.Event | None = None) -> torch.Tensor:
    """A zeroed cache tensor; on a Linux CPU, on transparent huge pages (``tritlm/hugepages.py``):
    every (slot, head) of the cache is its own run of positions, so a decode step's key / value
    writes and its attention reads land in as many 4 KiB pages as it has rows, each a TLB miss
    (700M, 8 sequences: ~20 -> ~13 us a layer for the writes; at 250 positions attention ~8.1 ->
    ~7.5 ms a step). ``stop``: checked every 64 MiB, for a background allocation the process
    no longer wants (raises ``_Stopped``)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    t = huge_empty(n)
    for o in range(0, n, _ZERO_CHUNK):
        if stop is not None and stop.is_set():
            raise _Stopped
        ctypes.memset(t.data_ptr() + o, 0, min(_ZERO_CHUNK, n - o))
    return t.view(dtype).view(shape)


def _grown_specs(caches: list[list[torch.Tensor]], slots: int, length: int) -> list[list[tuple]]:
    return [[((slots, old.shape[1], length, *old.shape[3:]), old.dtype, old.device) for old in cache]
            for cache in caches]


def regrow(caches: list[list[torch.Tensor]], slots: int, length: int,
           fresh: list[list[torch.Tensor]] | None = None) -> None:
    """Replace each ``[slots0, kv_heads, length0, row]`` tensor of every list in ``caches`` (the
    keys', the values') by a zeroed ``[slots, kv_heads, length, row]`` one (at least as large)
    holding its contents: in place in the lists, which the engine's :class:`SlotCache` and a
    prefix cache share. ``fresh``: those zeroed tensors, allocated ahead (:class:`GrowAhead`).
    Every new tensor is allocated before any is swapped in, so running out of memory leaves the
    cache as it was."""
    new = fresh if fresh is not None else [[cache_zeros(*spec) for spec in cache]
                                           for cache in _grown_specs(caches, slots, length)]
    for cache, tensors in zip(caches, new):
        for i, (old, t) in enumerate(zip(cache, tensors)):
            t[:old.shape[0], :, :old.shape[2]] = old
            cache[i] = t


class GrowAhead:
    """The next size of a growing cache, allocated on a background thread while the current one
    still has room, so that growing is a copy instead of a stall.

    Allocating is the slow part: the first touch of fresh memory on transparent huge pages, which
    a host whose THP ``defrag`` is ``madvise`` compacts on fault (700M, 8 slots: 256 -> 512
    positions stalled a batch 1.0-1.8 s, 512 -> 1024 3.3 s). The thread takes CPU from the
    forward passes meanwhile, but nothing waits on it unless the cache must grow before it is
    done. One allocation at a time; a growth to other shapes (more slots, a longer jump) drops it.

    The thread is not a daemon, and zeroes with libc in 64 MiB pieces: a daemon thread inside a
    torch call when the interpreter exits aborts the process ("terminate called without an active
    exception"); at exit this one stops at the next piece and the interpreter waits for that."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._box: dict = {}
        self.used = 0  # growths that found their tensors ready

    def prepare(self, caches: list[list[torch.Tensor]], slots: int, length: int) -> None:
        """Start allocating ``regrow(caches, slots, length)``'s tensors (no-op when under way)."""
        if self._key == (slots, length) or _EXITING.is_set():
            return
        self.discard()
        specs, box = _grown_specs(caches, slots, length), {}

        def work() -> None:
            try:
                box["new"] = [[cache_zeros(*spec, stop=_EXITING) for spec in cache] for cache in specs]
            except Exception:  # noqa: BLE001 - out of memory, or exiting: the growth allocates in place and reports
                pass

        self._key, self._box = (slots, length), box
        self._thread = threading.Thread(target=work, name="tritlm-kv-grow")
        self._thread.start()

    def take(self, slots: int, length: int) -> list[list[torch.Tensor]] | None:
        """The tensors for ``(slots, length)`` (waiting for them if still being allocated), or
        None when none were prepared for those shapes or their allocation failed."""
        if self._key != (slots, length):
            self.discard()
            return None
        assert self._thread is not None
        self._thread.join()
        new = self._box.get("new")
        self._key, self._thread, self._box = None, None, {}
        self.used += new is not None
        return new

    def discard(self) -> None:
        if self._thread is not None:
            self._thread.join()  # its memory goes with it, before anything else is allocated
        self._key, self._thread, self._box = None, None, {}


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to ``max_len``.

    ``pos`` is how many positions are filled; a forward pass with ``T`` new tokens writes slots
    ``pos .. pos+T`` and the caller advances ``pos`` once all layers have run. The protocol the
    transformer uses (``positions``, ``update``, ``advance``) is shared with the packed runtime's
    slot cache (:class:`SlotCache`).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.pos = 0

    def positions(self, b: int, t: int) -> torch.Tensor:
        """Positions of ``t`` new tokens (the same for every row): ``[T]``."""
        return torch.arange(self.pos, self.pos + t, device=self.k[0].device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new keys/values; return every key/value they attend to and the mask (None:
        causal attention over them, which is right when the cache was empty or ``t == 1``)."""
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        mask = None
        if self.pos and t > 1:  # new tokens see the whole cache plus the causal part of themselves
            mask = torch.ones(t, end, dtype=torch.bool, device=k.device).tril(diagonal=self.pos)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask

    def advance(self, t: int) -> None:
        self.pos += t

    def reset(self) -> None:
        self.pos = 0


# An int8 ("q8") cache row: head_dim int8 levels, then the row's float32 scale in its 4 bytes.
Q8_EXTRA = 4


def kv_row_width(kv_dtype: torch.dtype, head_dim: int) -> int:
    """Last dimension of a cache tensor of ``kv_dtype`` holding ``head_dim`` values a row."""
    return head_dim + Q8_EXTRA if kv_dtype == torch.int8 else head_dim


def quantize_q8(x: torch.Tensor) -> torch.Tensor:
    """Rows ``[..., hd]`` as q8 cache rows ``[..., hd + 4]`` int8: scale = absmax / 127 in float32,
    levels round(x / scale) (half to even), the scale's bytes after them; an all-zero row has scale
    0. The C step writes the same bytes (tritlm_decode.c tt_to_q8): one IEEE division and rounding
    per value. Like llama.cpp's q8_0 cache, but one scale per head row instead of per 32 values."""
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(s > 0, xf / s, torch.zeros((), dtype=xf.dtype, device=xf.device)).round_().clamp_(-127, 127)
    return torch.cat([q.to(torch.int8), s.contiguous().view(torch.int8)], dim=-1)


def dequantize_q8(c: torch.Tensor) -> torch.Tensor:
    """q8 cache rows ``[..., hd + 4]`` back to float32 ``[..., hd]``: level times the row's scale."""
    hd = c.shape[-1] - Q8_EXTRA
    s = c[..., hd:].contiguous().view(torch.float32)
    return c[..., :hd].float() * s


def _store(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """New keys/values in the cache's form (fp16 rounding happens in the assignment)."""
    return quantize_q8(x) if cache_dtype == torch.int8 else x


def _widen(cached: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The cache's keys/values in the compute dtype: an fp16 or q8 cache is read back as float32
    (the new tokens' own keys/values too, as stored, so every position is the rounded one: the C
    step's math)."""
    if cached.dtype == torch.int8:
        return dequantize_q8(cached).to(like.dtype)
    return cached if cached.dtype == like.dtype else cached.to(like.dtype)


class SlotCache:
    """The engine's KV cache in the transformer's cache protocol (``positions`` / ``update`` /
    ``advance``): one call's rows are sequences in cache slots, each at its own start position.

    Keys/values live in ``k[layer]`` / ``v[layer]``, ``[slots, kv_heads, max_len, head_dim]``, in
    the compute dtype or fp16 (rounded when written, widened when read), or int8 q8 rows
    ``[..., head_dim + 4]`` (:func:`quantize_q8` when written, dequantised when read).
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v
        self.device = k[0].device
        self.slots: list[int] = [0]
        self.starts = torch.zeros(1, dtype=torch.long, device=self.device)
        self._start0 = 0  # starts[0] as a Python int: no device sync per layer
        self.t = 0

    def at(self, slots: list[int], starts: list[int], t: int) -> SlotCache:
        """Set up the next forward: row b is slot ``slots[b]`` from position ``starts[b]``."""
        if len(slots) > 1 and t != 1:
            raise ValueError("several sequences at once decode one token each")
        self.slots, self.t = list(slots), t
        self.starts = torch.tensor(starts, dtype=torch.long, device=self.device)
        self._start0 = int(starts[0])
        return self

    def positions(self, b: int, t: int) -> torch.Tensor:
        if len(self.slots) == 1:
            s = self._start0
            return torch.arange(s, s + t, device=self.device)
        return self.starts.view(-1, 1)  # [B, 1]: one new token per row

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.k[layer], self.v[layer]
        if len(self.slots) == 1:
            slot, start, t = self.slots[0], self._start0, k.shape[2]
            end = start + t
            kc[slot, :, start:end] = _store(k[0], kc.dtype)
            vc[slot, :, start:end] = _store(v[0], vc.dtype)
            mask = None
            if start and t > 1:  # new tokens see the cache plus the causal part of themselves
                mask = torch.ones(t, end, dtype=torch.bool, device=self.device).tril(diagonal=start)
            return _widen(kc[slot:slot + 1, :, :end], k), _widen(vc[slot:slot + 1, :, :end], v), mask
        sl, pos = self.slots, self.starts
        idx = torch.tensor(sl, device=self.device)
        kc[idx, :, pos] = _store(k[:, :, 0], kc.dtype).to(kc.dtype)
        vc[idx, :, pos] = _store(v[:, :, 0], vc.dtype).to(vc.dtype)
        lmax = int(pos.max()) + 1
        b = len(sl)
        if sl == list(range(sl[0], sl[0] + b)):
            kk, vv = kc[sl[0]:sl[0] + b, :, :lmax], vc[sl[0]:sl[0] + b, :, :lmax]
        else:
            kk, vv = kc[idx, :, :lmax], vc[idx, :, :lmax]
        # [B, 1, 1, Lmax]: row b sees its own positions 0..pos_b
        mask = (torch.arange(lmax, device=self.device).view(1, -1) <= pos.view(-1, 1)).view(b, 1, 1, lmax)
        return _widen(kk, k), _widen(vv, v), mask

    def advance(self, t: int) -> None:  # the engine keeps each slot's fill level itself
        pass
