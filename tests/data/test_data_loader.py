"""TokenData: memmapped splits, stateless deterministic batches, full-coverage eval windows, errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from tritlm.data import TokenData, default_corpus_path, prepare_dataset, read_corpus
from tritlm.errors import ConfigError, FormatError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    (root / "c.txt").write_text(read_corpus(default_corpus_path())[:40_000])
    prepare_dataset(root / "c.txt", root / "ds")
    return root / "ds"


@pytest.fixture(scope="module")
def data(ds):
    return TokenData(ds)


def test_splits_are_memmaps_of_the_files(ds, data):
    for split, name in (("train", "train.bin"), ("val", "val.bin")):
        arr = data.array(split)
        assert isinstance(arr, np.memmap) and arr.filename is not None
        assert np.array_equal(arr, np.fromfile(ds / name, dtype=np.uint16))
        assert data.n_tokens(split) == len(arr)
    assert data.tokenizer.kind == "char" and data.vocab_size == data.tokenizer.vocab_size


def test_batches_are_shifted_windows_from_the_file(data):
    x, y = data.get_batch("train", 7, batch_size=8, block_size=16, seed=1)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = sliding_window_view(np.asarray(data.array("train")), 17)
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert np.all(windows == row, axis=1).any()
    xv, yv = data.get_batch("val", 0, 4, 32, seed=1)
    assert xv.shape == (4, 32) and torch.equal(xv[:, 1:], yv[:, :-1])


def test_batches_are_a_pure_function_of_seed_step_micro_rank(ds, data):
    args = {"batch_size": 6, "block_size": 12, "seed": 1337}
    ref = [data.get_batch("train", s, **args)[0] for s in range(10)]
    again = TokenData(ds)  # a fresh loader, as after a resume, in another order
    for s in reversed(range(10)):
        assert torch.equal(again.get_batch("train", s, **args)[0], ref[s])
    base = ref[3]
    variants = [data.get_batch("train", 4, **args)[0],
                data.get_batch("train", 3, **{**args, "seed": 1338})[0],
                data.get_batch("train", 3, **args, micro=1)[0],
                data.get_batch("train", 3, **args, rank=1, world_size=2)[0],
                data.get_batch("train", 3, **args, rank=0, world_size=2)[0]]
    for v in variants:
        assert not torch.equal(v, base)
    r0 = data.get_batch("train", 3, **args, rank=0, world_size=2)[0]
    r1 = data.get_batch("train", 3, **args, rank=1, world_size=2)[0]
    assert not torch.equal(r0, r1)


def test_windows_reach_both_ends_of_a_split_and_never_past_them(tmp_path):
    (tmp_path / "c.txt").write_text("abcdefghijklmnopqrstuvwxyz" * 2)  # 52 tokens
    prepare_dataset(tmp_path / "c.txt", tmp_path / "ds", val_fraction=0.5)
    d = TokenData(tmp_path / "ds")
    x, y = d.get_batch("train", 0, batch_size=2000, block_size=4, seed=0)  # train = 26 tokens
    starts = set(x[:, 0].tolist())  # train is "a..z": token id == position
    assert starts == set(range(22))  # every start 0 .. 26-4-1, so the last token is a target
    assert int(y[:, -1].max()) == 25


@pytest.mark.parametrize("batch_size,block_size", [(3, 16), (4, 7), (1, 100), (50, 9)])
def test_eval_batches_cover_every_token_once(data, batch_size, block_size):
    val = np.asarray(data.array("val"), dtype=np.int64)
    xs, ys = [], []
    batches = list(data.eval_batches("val", batch_size, block_size))
    for x, _y in batches[:-1]:
        assert x.shape[1] == block_size and 1 <= x.shape[0] <= batch_size
    for x, y in batches:
        assert x.dtype == torch.int64 and x.shape == y.shape and torch.equal(x[:, 1:], y[:, :-1])
        xs.append(x.reshape(-1))
        ys.append(y.reshape(-1))
    assert torch.cat(xs).tolist() == val[:-1].tolist()  # inputs: every token but the last, in order
    assert torch.cat(ys).tolist() == val[1:].tolist()  # targets: every token but the first, once


def test_eval_batches_without_a_remainder(tmp_path):
    (tmp_path / "c.txt").write_text("0123456789" * 10)
    prepare_dataset(tmp_path / "c.txt", tmp_path / "ds", val_fraction=0.21)  # 21 val tokens
    d = TokenData(tmp_path / "ds")
    shapes = [tuple(x.shape) for x, _ in d.eval_batches("val", 3, 5)]
    assert shapes == [(3, 5), (1, 5)]  # 20 targets = 4 windows of 5, no tail


def test_bad_arguments(data):
    n = data.n_tokens("val")
    with pytest.raises(ConfigError, match="too long"):
        data.get_batch("val", 0, 2, n, seed=0)
    with pytest.raises(ConfigError, match="too long"):
        next(data.eval_batches("val", 2, n))
    data.get_batch("val", 0, 2, n - 1, seed=0)  # the longest window that fits
    with pytest.raises(ConfigError, match="unknown split"):
        data.n_tokens("test")
    with pytest.raises(ConfigError, match="rank"):
        data.get_batch("train", 0, 2, 8, seed=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        data.get_batch("train", 0, 0, 8, seed=0)
    x, _ = data.get_batch("train", 0, 2, 8, seed=-5)  # negative seeds are fine
    assert x.shape == (2, 8)


def test_damaged_datasets_are_format_errors(ds, tmp_path):
    with pytest.raises(FormatError, match="not found"):
        TokenData(tmp_path / "nope")
    cases = {
        "no meta.json": lambda d: (d / "meta.json").unlink(),
        "train.bin is missing": lambda d: (d / "train.bin").unlink(),
        "wrong dtype or a truncated file": lambda d: (d / "val.bin").write_bytes(b"\0" * 6),
        "no tokenizer|tokenizer not found": lambda d: shutil.rmtree(d / "tokenizer"),
        "not valid JSON": lambda d: (d / "meta.json").write_text("{"),
    }
    for i, (msg, damage) in enumerate(cases.items()):
        d = tmp_path / f"d{i}"
        shutil.copytree(ds, d)
        damage(d)
        with pytest.raises(FormatError, match=msg):
            TokenData(d)
    # meta.json says uint32 for files written as uint16: the sizes no longer agree.
    d = tmp_path / "dtype"
    shutil.copytree(ds, d)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    with pytest.raises(FormatError, match="wrong dtype"):
        TokenData(d)
    (d / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(FormatError, match="unsupported token dtype"):
        TokenData(d)
    # A tokenizer swapped for another one is caught by its fingerprint.
    d = tmp_path / "swap"
    shutil.copytree(ds, d)
    (d / "tokenizer" / "chars.json").write_text(json.dumps(list("abc")))
    with pytest.raises(FormatError, match="not the tokenizer"):
        TokenData(d)
