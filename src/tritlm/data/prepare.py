"""Tokenise a corpus once into ``train.bin`` / ``val.bin`` (nanoGPT layout) plus meta and tokenizer.

A dataset folder holds:

* ``train.bin``, ``val.bin``: raw little-endian token ids (uint16 when every id fits, else
  uint32); train is the first ``1 - val_fraction`` of the token stream, val the rest.
* ``tokenizer/``: the tokenizer (``Tokenizer.save``).
* ``meta.json``: :class:`DatasetMeta`. It is written last and removed first, so its presence
  means the folder is complete: a run killed at any point leaves either no ``meta.json`` (the next
  call tokenises again) or a whole dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritlm.data.corpus import read_corpus
from tritlm.data.tokenizer import Tokenizer
from tritlm.data.tokenizer_load import build_tokenizer
from tritlm.errors import ConfigError, FormatError
from tritlm.io_atomic import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

META_FILE, TRAIN_FILE, VAL_FILE, TOKENIZER_DIR = "meta.json", "train.bin", "val.bin", "tokenizer"
FORMAT_VERSION = 1
MIN_SPLIT_TOKENS = 2  # a split needs one input and one target token


@dataclass(frozen=True)
class DatasetMeta:
    vocab_size: int
    dtype: str  # "uint16" | "uint32"
    n_train: int
    n_val: int
    tokenizer_kind: str
    tokenizer_fingerprint: str
    source_sha256: str  # of the corpus text as read (UTF-8), so a folder's files all count
    tokenizer_spec: str
    val_fraction: float
    source: str = ""  # informational: the path the corpus was read from
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "meta.json") -> DatasetMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            meta = cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, AttributeError) as e:
            raise FormatError(f"{where} is not a dataset description ({e})") from None
        if meta.dtype not in ("uint16", "uint32"):
            raise FormatError(f"{where}: unsupported token dtype {meta.dtype!r}")
        if meta.format_version > FORMAT_VERSION:
            raise FormatError(f"{where} has format {meta.format_version}; this tritlm reads up to "
                              f"{FORMAT_VERSION}")
        return meta

    @classmethod
    def read(cls, directory: str | Path) -> DatasetMeta:
        p = Path(directory) / META_FILE
        if not p.is_file():
            raise FormatError(f"{Path(directory)} is not a complete tokenised dataset (no {META_FILE}); "
                              "create it with `tritlm tokenize`")
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise FormatError(f"{p} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise FormatError(f"{p} is not a dataset description")
        return cls.from_dict(d, str(p))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, i.e. vocab_size <= 65536; else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _is_current(out: Path, want: dict[str, Any], tok_spec_is_path: bool, fingerprint: str | None) -> DatasetMeta | None:
    """The existing dataset in ``out`` if it was made from the same inputs and is intact."""
    try:
        meta = DatasetMeta.read(out)
    except FormatError:
        return None
    if any(getattr(meta, k) != v for k, v in want.items()):
        return None
    if tok_spec_is_path and fingerprint != meta.tokenizer_fingerprint:
        return None  # the tokenizer file behind the same path changed
    item = np.dtype(meta.dtype).itemsize
    for name, n in ((TRAIN_FILE, meta.n_train), (VAL_FILE, meta.n_val)):
        f = out / name
        if not f.is_file() or f.stat().st_size != n * item:
            log.warning("%s: %s is missing or has the wrong size; tokenising again", out, name)
            return None
    if not (out / TOKENIZER_DIR).is_dir():
        return None
    return meta


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove temporaries left by killed runs (``*.tmp-<pid>`` whose process is gone)."""
    for p in out.glob("*.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _write_array(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        arr.tofile(f)


def prepare_dataset(source: str | Path, out_dir: str | Path, tokenizer: str | Tokenizer = "char",
                    val_fraction: float = 0.1) -> DatasetMeta:
    """Tokenise ``source`` (see :func:`read_corpus`) into ``out_dir``; return its description.

    ``tokenizer`` is a spec for :func:`build_tokenizer` (``char`` | ``byte`` | ``bpe:<n>`` | a path)
    or a Tokenizer. If ``out_dir`` already holds an intact dataset of the same corpus text,
    tokenizer spec and val_fraction, it is returned as is, without tokenising again.
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction!r}")
    out = Path(out_dir)
    text = read_corpus(source)
    sha = _sha256(text)

    given: Tokenizer | None = tokenizer if isinstance(tokenizer, Tokenizer) else None
    if given is not None:
        spec = f"{given.kind}@{given.fingerprint()}"
        is_path = True
        tok: Tokenizer | None = given
    else:
        spec = str(tokenizer).strip()
        is_path = not (spec in ("char", "byte") or spec.startswith("bpe"))
        # A path is cheap to load and may have changed behind the same name: check its fingerprint.
        tok = build_tokenizer(spec, text) if is_path else None
    want = {"source_sha256": sha, "tokenizer_spec": spec, "val_fraction": float(val_fraction)}
    current = _is_current(out, want, is_path, tok.fingerprint() if tok is not None else None)
    if current is not None:
        log.info("%s is already tokenised (%d + %d tokens); reusing it", out, current.n_train, current.n_val)
        return current

    t0 = time.perf_counter()
    if tok is None:
        tok = build_tokenizer(spec, text)
    ids = tok.encode_array(text)
    n = len(ids)
    n_train = int(n * (1.0 - val_fraction))
    n_val = n - n_train
    if n_train < MIN_SPLIT_TOKENS or n_val < MIN_SPLIT_TOKENS:
        raise ConfigError(f"corpus {source} gives {n} tokens: too few for a train/val split at "
                          f"val_fraction={val_fraction} (each split needs {MIN_SPLIT_TOKENS})")
    dtype = token_dtype(tok.vocab_size)
    if n and (int(ids.min()) < 0 or int(ids.max()) >= tok.vocab_size):
        raise FormatError(f"tokenizer {spec} produced ids outside its vocabulary of {tok.vocab_size}")
    meta = DatasetMeta(vocab_size=tok.vocab_size, dtype=dtype.name, n_train=n_train, n_val=n_val,
                       tokenizer_kind=tok.kind, tokenizer_fingerprint=tok.fingerprint(),
                       source_sha256=sha, tokenizer_spec=spec, val_fraction=float(val_fraction),
                       source=str(source))

    out.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    # Remove the old description first: from here until the new one lands the folder is incomplete.
    (out / META_FILE).unlink(missing_ok=True)
    suffix = f".tmp-{os.getpid()}"
    arr = ids.astype(dtype.newbyteorder("<"), copy=False)
    # Each file is written as NAME.tmp-<pid> (_clean_stale removes those of killed runs), fsynced and
    # renamed into place; meta.json, which marks the dataset complete, comes last.
    for name, part in ((TRAIN_FILE, arr[:n_train]), (VAL_FILE, arr[n_train:])):
        with atomic_path(out / name, suffix=suffix) as tmp:
            _write_array(tmp, part)
    with atomic_path(out / TOKENIZER_DIR, is_dir=True, suffix=suffix) as tmp:
        tok.save(tmp)
    write_json_atomic(out / META_FILE, meta.to_dict(), suffix=suffix)
    log.info("tokenised %s with %s: %d train + %d val tokens (vocab %d, %s) in %.1fs -> %s", source, spec,
             n_train, n_val, tok.vocab_size, dtype.name, time.perf_counter() - t0, out)
    return meta
