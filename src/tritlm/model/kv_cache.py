"""Preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to ``max_len``.

    ``pos`` is how many positions are filled; a forward pass with ``T`` new tokens writes slots
    ``pos .. pos+T`` and the caller advances ``pos`` once all layers have run. The protocol the
    transformer uses (``positions``, ``update``, ``advance``) is shared with the packed runtime's
    slot cache (``tritlm.infer.engine.SlotCache``).
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
