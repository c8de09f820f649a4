"""Batches from a tokenised dataset, memory-mapped, with stateless deterministic sampling.

Training windows are drawn at random, but the offsets of a batch are a pure function of
``(seed, split, step, micro, rank, world_size)``: a run resumed at step ``s`` draws exactly the batches
an uninterrupted run would have, with no loader state in the checkpoint.

Distributed training: every rank samples from the **whole** split with its own random stream
(``rank`` and ``world_size`` are part of the seed), rather than from a 1/world_size slice. Each rank
therefore sees the same distribution of text, and the streams of different ranks are independent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tritlm.data.prepare import META_FILE, TOKENIZER_DIR, TRAIN_FILE, VAL_FILE, DatasetMeta
from tritlm.data.tokenizer import Tokenizer
from tritlm.data.tokenizer_load import load_tokenizer
from tritlm.errors import ConfigError, FormatError

log = logging.getLogger(__name__)

SPLITS = {"train": (TRAIN_FILE, 0), "val": (VAL_FILE, 1)}
# Mixed into every seed so these streams never coincide with other users of default_rng(seed).
_STREAM_TAG = 0x7E1B_A7C4


class TokenData:
    """A dataset folder written by :func:`prepare_dataset`: ``train``/``val`` token memmaps, the
    meta and the tokenizer."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FormatError(f"dataset folder not found: {self.dir}")
        self.meta = DatasetMeta.read(self.dir)
        dtype = np.dtype(self.meta.dtype).newbyteorder("<")
        self._data: dict[str, np.memmap] = {}
        for split, (name, _) in SPLITS.items():
            path = self.dir / name
            n = self.meta.n_train if split == "train" else self.meta.n_val
            if not path.is_file():
                raise FormatError(f"{path} is missing; tokenise the dataset again")
            size = path.stat().st_size
            if size != n * dtype.itemsize:
                raise FormatError(f"{path} holds {size} bytes, but {META_FILE} says {n} {self.meta.dtype} "
                                  f"tokens ({n * dtype.itemsize} bytes): wrong dtype or a truncated file")
            # Memory-mapped: a multi-GB split costs no RAM beyond the pages a batch touches.
            self._data[split] = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        self.tokenizer: Tokenizer = load_tokenizer(self.dir / TOKENIZER_DIR)
        if self.tokenizer.fingerprint() != self.meta.tokenizer_fingerprint:
            raise FormatError(f"{self.dir / TOKENIZER_DIR} is not the tokenizer these tokens were made with "
                              f"(fingerprint {self.tokenizer.fingerprint()} != {self.meta.tokenizer_fingerprint})")
        if self.tokenizer.vocab_size != self.meta.vocab_size:
            raise FormatError(f"{self.dir}: tokenizer vocabulary {self.tokenizer.vocab_size} != "
                              f"{self.meta.vocab_size} in {META_FILE}")

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    def array(self, split: str) -> np.memmap:
        """The split's tokens as a read-only ``np.memmap``."""
        if split not in self._data:
            raise ConfigError(f"unknown split {split!r}: expected 'train' or 'val'")
        return self._data[split]

    def n_tokens(self, split: str) -> int:
        return len(self.array(split))

    def _check_block(self, split: str, block_size: int, n: int) -> None:
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, not {block_size}")
        if block_size >= n:
            raise ConfigError(f"block_size {block_size} is too long for the {split} split of {n} tokens "
                              f"(a window needs block_size + 1 tokens)")

    def get_batch(self, split: str, step: int, batch_size: int, block_size: int, seed: int,
                  rank: int = 0, world_size: int = 1, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` int64 tensors ``[batch_size, block_size]``, ``y`` = ``x`` shifted by one token.

        Window starts are uniform over the split, drawn from a generator seeded with
        ``(seed, split, step, micro, rank, world_size)`` only.
        """
        data = self.array(split)
        n = len(data)
        self._check_block(split, block_size, n)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not within world_size {world_size}")
        if step < 0 or micro < 0:
            raise ConfigError(f"step and micro must be >= 0, not {step} and {micro}")
        # SeedSequence wants non-negative words; `% 2**64` keeps negative seeds distinct and valid.
        entropy = [_STREAM_TAG, seed % (1 << 64), SPLITS[split][1], step, micro, rank, world_size]
        rng = np.random.default_rng(entropy)
        starts = rng.integers(0, n - block_size, size=batch_size)  # start + block_size + 1 <= n
        idx = starts[:, None] + np.arange(block_size + 1)
        w = data[idx].astype(np.int64)  # fancy indexing reads only these windows from the memmap
        return torch.from_numpy(np.ascontiguousarray(w[:, :-1])), torch.from_numpy(np.ascontiguousarray(w[:, 1:]))

    def eval_batches(self, split: str, batch_size: int, block_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows covering the whole split in order.

        Window ``k`` predicts tokens ``k*T+1 .. k*T+T`` from ``k*T .. k*T+T-1``, so every token but
        the first (which has no context) is a target exactly once. Full windows come in batches of
        ``batch_size`` rows (the last batch may have fewer rows); then, if the split length leaves a
        remainder, one final ``[1, r]`` batch with the last ``r < T`` targets. Nothing is dropped.
        """
        data = self.array(split)
        n = len(data)
        self._check_block(split, block_size, n)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
        t = block_size
        n_full = (n - 1) // t
        for b0 in range(0, n_full, batch_size):
            rows = min(batch_size, n_full - b0)
            chunk = np.asarray(data[b0 * t: (b0 + rows) * t + 1], dtype=np.int64)
            yield (torch.from_numpy(chunk[:-1].reshape(rows, t).copy()),
                   torch.from_numpy(chunk[1:].reshape(rows, t).copy()))
        r = n - 1 - n_full * t
        if r > 0:
            chunk = np.asarray(data[n_full * t:], dtype=np.int64)
            yield torch.from_numpy(chunk[None, :-1].copy()), torch.from_numpy(chunk[None, 1:].copy())

    def __repr__(self) -> str:
        m = self.meta
        return (f"TokenData({str(self.dir)!r}, train={m.n_train}, val={m.n_val}, vocab={m.vocab_size}, "
                f"tokenizer={m.tokenizer_kind})")
