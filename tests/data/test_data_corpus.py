"""Corpus reading: the bundled gz, folders, and one-line errors for bad input."""

import gzip
import hashlib

import pytest

from tritlm.data import corpus_files, default_corpus_path, read_corpus
from tritlm.errors import FormatError

TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_bundled_tiny_shakespeare_is_the_reference_text():
    p = default_corpus_path()
    assert p.is_file() and p.name == "tinyshakespeare.txt.gz"
    text = read_corpus(p)
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    assert hashlib.sha256(text.encode()).hexdigest() == TINY_SHAKESPEARE_SHA256


def test_folder_reads_text_files_sorted_and_joined(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "c.raw").write_bytes(b"ccc\r\n")  # bytes kept as is: no newline translation
    (tmp_path / "a.txt").write_text("aaa")
    with gzip.open(tmp_path / "d.txt.gz", "wb") as f:
        f.write("dé".encode())
    (tmp_path / "e.bin").write_bytes(b"\xff\xfe ignored")
    (tmp_path / "f.txt").write_bytes("\ufeffbom".encode())
    assert [p.name for p in corpus_files(tmp_path)] == ["a.txt", "c.raw", "d.txt.gz", "f.txt"]
    assert read_corpus(tmp_path) == "aaa\n\nccc\r\n\n\ndé\n\nbom"
    assert read_corpus(str(tmp_path / "a.txt")) == "aaa"


def test_corpus_errors_are_one_line(tmp_path):
    with pytest.raises(FormatError, match="corpus not found"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FormatError, match="not UTF-8.*0xe9 at offset 3"):
        read_corpus(tmp_path / "latin1.txt")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(FormatError, match="not a valid gzip"):
        read_corpus(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "cut.gz", "wb") as f:
        f.write(b"x" * 10000)
    (tmp_path / "cut.gz").write_bytes((tmp_path / "cut.gz").read_bytes()[:20])
    with pytest.raises(FormatError, match="not a valid gzip"):
        read_corpus(tmp_path / "cut.gz")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(FormatError, match="empty"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FormatError, match="holds no"):
        read_corpus(tmp_path / "nothing")
    for e in (FormatError("x"),):
        assert "\n" not in str(e)
