"""prepare_dataset: exact token streams, the train/val split, dtype choice, idempotency, atomicity."""

import json

import numpy as np
import pytest

from tritlm.data import (
    ByteTokenizer,
    CharTokenizer,
    DatasetMeta,
    TokenData,
    default_corpus_path,
    load_tokenizer,
    prepare_dataset,
    read_corpus,
    token_dtype,
)
from tritlm.data import prepare as prep
from tritlm.errors import ConfigError, FormatError


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(read_corpus(default_corpus_path())[:60_000] + "\nnaïve 漢字 🙂\n")
    return p


def _bin(d, name, dtype):
    return np.fromfile(d / name, dtype=dtype)


@pytest.mark.parametrize("spec", ["char", "byte", "bpe:300"])
def test_token_streams_are_exact(tmp_path, corpus, spec):
    out = tmp_path / "ds"
    meta = prepare_dataset(corpus, out, tokenizer=spec)
    text = corpus.read_text()
    tok = load_tokenizer(out / "tokenizer")
    ids = tok.encode(text)
    assert meta.n_train + meta.n_val == len(ids)
    assert meta.n_train == int(len(ids) * 0.9)  # train = first 90%, val = last 10%
    train, val = _bin(out, "train.bin", meta.dtype), _bin(out, "val.bin", meta.dtype)
    assert (len(train), len(val)) == (meta.n_train, meta.n_val)
    assert np.concatenate([train, val]).tolist() == ids
    assert meta.dtype == "uint16" and meta.tokenizer_spec == spec and meta.tokenizer_kind == tok.kind
    assert meta.tokenizer_fingerprint == tok.fingerprint() and meta.vocab_size == tok.vocab_size
    assert DatasetMeta.read(out) == meta
    assert json.loads((out / "meta.json").read_text())["source_sha256"] == meta.source_sha256
    assert tok.decode(ids) == text


def test_nanogpt_split_of_tiny_shakespeare(tmp_path):
    meta = prepare_dataset(default_corpus_path(), tmp_path / "ds")
    assert (meta.n_train, meta.n_val, meta.vocab_size) == (1_003_854, 111_540, 65)  # as nanoGPT's shakespeare_char


def test_idempotent_unless_an_input_changes(tmp_path, corpus):
    out = tmp_path / "ds"
    m1 = prepare_dataset(corpus, out)
    stamps = {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.is_file()}
    m2 = prepare_dataset(str(corpus), out, tokenizer="char", val_fraction=0.1)
    assert m2 == m1
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.is_file()} == stamps
    m3 = prepare_dataset(corpus, out, val_fraction=0.2)  # another split: tokenised again
    assert m3.n_val > m1.n_val and (out / "val.bin").stat().st_size == m3.n_val * 2
    corpus.write_text(corpus.read_text() + "more text")  # another corpus text
    m4 = prepare_dataset(corpus, out, val_fraction=0.2)
    assert m4.source_sha256 != m3.source_sha256 and m4.n_train + m4.n_val == m3.n_train + m3.n_val + 9
    (out / "train.bin").write_bytes(b"\0\0")  # a damaged dataset is not reused
    m5 = prepare_dataset(corpus, out, val_fraction=0.2)
    assert (out / "train.bin").stat().st_size == m5.n_train * 2
    assert not list(out.glob("*.tmp-*"))


def test_dtype_is_uint32_only_when_ids_do_not_fit_uint16(tmp_path):
    assert token_dtype(65) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    # 70,000 distinct characters (planes 1-2, no surrogates) -> a char vocabulary past 65,536.
    text = "".join(chr(0x10000 + i) for i in range(70_000)) * 2
    (tmp_path / "wide.txt").write_text(text)
    meta = prepare_dataset(tmp_path / "wide.txt", tmp_path / "ds")
    assert meta.vocab_size == 70_000 and meta.dtype == "uint32"
    stream = np.concatenate([_bin(tmp_path / "ds", n, np.uint32) for n in ("train.bin", "val.bin")])
    assert stream.tolist() == list(range(70_000)) * 2
    assert TokenData(tmp_path / "ds").array("val").dtype == np.uint32


def test_a_tokenizer_object_or_a_tokenizer_path(tmp_path, corpus):
    meta = prepare_dataset(corpus, tmp_path / "a", tokenizer=ByteTokenizer())
    assert meta.tokenizer_kind == "byte" and meta.vocab_size == 257
    meta_b = prepare_dataset(corpus, tmp_path / "b", tokenizer=str(tmp_path / "a" / "tokenizer"))
    assert meta_b.tokenizer_fingerprint == meta.tokenizer_fingerprint and meta_b.n_train == meta.n_train
    # The same path with another tokenizer behind it is tokenised again.
    tok_dir = tmp_path / "tok"
    CharTokenizer.from_text(corpus.read_text()).save(tok_dir)
    m1 = prepare_dataset(corpus, tmp_path / "c", tokenizer=str(tok_dir))
    CharTokenizer.from_text(corpus.read_text() + "§").save(tok_dir)
    m2 = prepare_dataset(corpus, tmp_path / "c", tokenizer=str(tok_dir))
    assert m2.tokenizer_fingerprint != m1.tokenizer_fingerprint and m2.vocab_size == m1.vocab_size + 1


def test_a_killed_run_never_leaves_a_dataset_that_looks_complete(tmp_path, corpus, monkeypatch):
    out = tmp_path / "ds"
    prepare_dataset(corpus, out)
    real = prep._write_array
    calls = []

    def dies_on_second_file(path, arr):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(path, arr)

    monkeypatch.setattr(prep, "_write_array", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(corpus, out, tokenizer="byte")  # a re-tokenisation that dies half way
    assert not (out / "meta.json").exists()
    with pytest.raises(FormatError, match="no meta.json"):
        TokenData(out)
    monkeypatch.setattr(prep, "_write_array", real)
    (out / "val.bin.tmp-999999999").write_bytes(b"stale")  # left by a process that is gone
    meta = prepare_dataset(corpus, out, tokenizer="byte")
    assert meta.tokenizer_kind == "byte" and TokenData(out).tokenizer.kind == "byte"
    assert not list(out.glob("*.tmp-*"))


def test_prepare_errors(tmp_path, corpus):
    with pytest.raises(FormatError, match="corpus not found"):
        prepare_dataset(tmp_path / "missing.txt", tmp_path / "ds")
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="val_fraction"):
            prepare_dataset(corpus, tmp_path / "ds", val_fraction=bad)
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(ConfigError, match="too few"):
        prepare_dataset(tmp_path / "tiny.txt", tmp_path / "ds")
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        prepare_dataset(corpus, tmp_path / "ds", tokenizer="wordpiece")
    assert not (tmp_path / "ds" / "meta.json").exists()
