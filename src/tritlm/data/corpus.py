"""Reading raw text corpora: one file, a gzipped file, or a folder of them.

Files are read as bytes and decoded as strict UTF-8 (no newline translation), so the text, and
therefore its hash and its tokens, are exactly what is on disk on every platform.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from importlib import resources
from pathlib import Path

from tritlm.errors import FormatError

log = logging.getLogger(__name__)

# Suffixes a corpus folder is searched for; "x.txt.gz" counts through its ".gz".
CORPUS_SUFFIXES = (".txt", ".raw", ".gz")
FOLDER_SEPARATOR = "\n\n"


def default_corpus_path() -> Path:
    """The bundled Tiny Shakespeare (gzipped package data): the corpus used when none is given."""
    # The package is installed as plain files (editable or wheel), so the resource is a real path.
    return Path(str(resources.files("tritlm.data").joinpath("corpus", "tinyshakespeare.txt.gz")))


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise FormatError(f"{path} is not a valid gzip file ({e})") from None
    except OSError as e:
        raise FormatError(f"cannot read {path}: {e.strerror or e}") from None


def _decode(data: bytes, path: Path) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path} is not UTF-8 text (undecodable byte 0x{data[e.start]:02x} at offset "
                          f"{e.start})") from None
    # A byte-order mark is an encoding artefact, not text the model should learn.
    return text.removeprefix("\ufeff")


def corpus_files(path: str | Path) -> list[Path]:
    """The files ``read_corpus`` would read, in order: ``[path]`` for a file, else the folder's
    .txt/.raw/.gz files (recursively, sorted by their relative path)."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"corpus not found: {p}")
    if p.is_file():
        return [p]
    files = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix in CORPUS_SUFFIXES),
                   key=lambda f: f.relative_to(p).as_posix())
    if not files:
        raise FormatError(f"corpus folder {p} holds no {'/'.join(CORPUS_SUFFIXES)} files")
    return files


def read_corpus(path: str | Path) -> str:
    """The text of a corpus: a file, a ``.gz`` file, or a folder (its .txt/.raw/.gz files, sorted,
    joined with a blank line). Raises FormatError for a missing path, bad gzip, non-UTF-8 bytes or
    an empty corpus."""
    files = corpus_files(path)
    text = FOLDER_SEPARATOR.join(_decode(_read_bytes(f), f) for f in files)
    if not text:
        raise FormatError(f"corpus {path} is empty")
    log.debug("read %d characters from %d file(s) under %s", len(text), len(files), path)
    return text
