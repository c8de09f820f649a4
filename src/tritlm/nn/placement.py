"""Where a runtime model's streamed weights live: every C kernel's weights (and an fp16 head)
in one buffer on transparent huge pages (``tritlm/hugepages.py``), since a decode step reads them
all and, on a virtual machine, each 4 KiB page's TLB miss walks two page tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tritlm.nn.packed_linear import F16Linear, KernelLinear, SplitLinear, TritPlaneHead


def streamed_weights(runner) -> list:
    """The objects under ``runner`` whose weights a C kernel streams every call (each with
    ``weight_nbytes``, ``weight_ptr`` and ``move_weights``); dense and Triton runners have none."""
    if isinstance(runner, KernelLinear):
        return [runner.kernel] if runner._fast else []
    if isinstance(runner, F16Linear):
        return [runner.mm]
    if isinstance(runner, TritPlaneHead):
        return streamed_weights(runner.lin)
    if isinstance(runner, SplitLinear):
        return [h for p in runner.parts for h in streamed_weights(p)]
    return []


def move_to_huge_pages(runners: list, shared: Sequence[torch.Tensor] = ()) -> int:
    """Copy the streamed weights of ``runners`` into one huge-page arena (``tritlm/hugepages.py``:
    fewer TLB misses per step). ``shared``: tensors the caller keeps (a packed model's fp16 head,
    a tied embedding) that a runner reads in place: each moves along (``set_`` onto the arena
    copy, so every holder of that tensor sees it and the old memory goes), or stays where it is if
    it is not one contiguous tensor of the runner's bytes. Returns the bytes moved."""
    from tritlm.hugepages import HUGE, Arena, release_free_heap

    by_ptr = {t.data_ptr(): t for t in shared}
    holders, aliases = [], []
    for h in (h for r in runners for h in streamed_weights(r) if h.weight_nbytes):
        src = by_ptr.get(h.weight_ptr)
        if src is not None and not (src.is_contiguous() and src.numel() * src.element_size() == h.weight_nbytes):
            continue  # a view of something larger: moving would keep two copies
        holders.append(h)
        aliases.append(src)
    sizes = [h.weight_nbytes for h in holders]
    if sum(sizes) < HUGE:  # under one huge page: nothing to gain
        return 0
    arena = Arena(sizes)
    for h, n, src in zip(holders, sizes, aliases):
        piece = arena.take(n)
        h.move_weights(piece)
        if src is not None:
            with torch.no_grad():
                src.set_(piece.view(src.dtype).view(src.shape))
    release_free_heap()  # the copies just left behind: ~1-3 MB each, kept by malloc otherwise
    return sum(sizes)


def place_packed_weights(runners: list, pm: Any) -> int:
    """:func:`move_to_huge_pages` for the runners of a :class:`~tritlm.formats.packed.PackedModel`
    ``pm``: an fp16 head or layer reads the packed model's own tensor in place, which moves along
    (one copy). Runners without C kernels (the dense baseline, the GPU's Triton ones) move nothing."""
    shared = [*pm.fp.values(), *(p.weights for p in pm.linears.values())]
    return move_to_huge_pages(runners, [t for t in shared if isinstance(t, torch.Tensor) and t.device.type == "cpu"])
