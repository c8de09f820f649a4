"""Host memory on transparent huge pages (2 MiB), for what the CPU runtime streams every step.

A decode step reads every packed weight (700M: ~170 MB, ~43k pages of 4 KiB) and writes and reads
its key / value rows in one run of positions per (slot, head). Each 4 KiB page is a TLB miss, and
in a virtual machine a miss walks two page tables (the guest's, then the host's for every level
of it). On the 2-core KVM guest this project runs on, the 700M model's weights on huge pages
took a 4608 x 1536 GEMV from memory 84-100 -> 61-77 us, and the same Linear at 8 tokens
122-153 -> 97-125 us (benchmarks/RESULTS.md, session 15).

Linux only, and only advice: a buffer is placed on 2 MiB boundaries and marked
``MADV_HUGEPAGE`` before it is first touched; where the kernel declines (THP off, memory too
fragmented) the pages are ordinary ones and nothing else changes.
"""

from __future__ import annotations

import ctypes
import sys

import torch

HUGE = 2 << 20  # bytes of one x86-64 huge page
_MADV_HUGEPAGE = 14
_ALIGN = 64  # pieces of an arena start on cache lines (the kernels' loads assume 64-byte rows)


def huge_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of ``nbytes``, on huge pages where the OS grants them
    (buffers under 2 MiB, and other systems, get an ordinary tensor)."""
    if nbytes < HUGE or not sys.platform.startswith("linux"):
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + HUGE, dtype=torch.uint8)  # not touched yet: the advice applies to every page
    off = -raw.data_ptr() % HUGE
    try:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(raw.data_ptr() + off),
                                                  ctypes.c_size_t((nbytes + HUGE - 1) // HUGE * HUGE),
                                                  _MADV_HUGEPAGE)
    except (OSError, AttributeError):  # no libc symbol: ordinary pages
        pass
    return raw[off:off + nbytes]


class Arena:
    """One huge-page buffer cut into 64-byte aligned pieces: many weights of ~0.5-3 MB each
    share huge pages instead of each rounding up to its own."""

    def __init__(self, sizes: list[int]):
        self.buf = huge_empty(sum(self.padded(n) for n in sizes))
        self.used = 0

    @staticmethod
    def padded(n: int) -> int:
        return (n + _ALIGN - 1) // _ALIGN * _ALIGN

    def take(self, nbytes: int) -> torch.Tensor:
        """The next ``nbytes`` (uint8); the sizes given at construction bound what can be taken."""
        end = self.used + self.padded(nbytes)
        if end > self.buf.numel():
            raise ValueError(f"arena of {self.buf.numel()} bytes cannot give {nbytes} more after {self.used}")
        piece = self.buf[self.used:self.used + nbytes]
        self.used = end
        return piece


def release_free_heap() -> None:
    """Hand the C heap's free memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).
    Buffers of a few MB freed after the first big one come from the heap, not from their own
    mappings (malloc raises its mmap threshold as it frees), and the heap keeps them resident:
    the weights' old copies after a move to the arena were ~170 MB of a 700M model's RSS."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
