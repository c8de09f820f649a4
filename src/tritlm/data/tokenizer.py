"""Tokenizers: characters, UTF-8 bytes, Hugging Face ``tokenizers`` (BPE) and SentencePiece.

All of them share one small interface (:class:`Tokenizer`): ``encode``/``decode``, ``vocab_size``,
``bos_id``/``eos_id``, ``save(dir)`` (reloaded by :func:`load_tokenizer`) and ``fingerprint()``,
a stable hash of the vocabulary that checkpoints record so that a model is never run with a
tokenizer it was not trained with.

Conventions shared by every kind:

* ``encode(text)`` turns plain text into ids and adds no BOS/EOS: the training stream is the text
  itself, and callers add special tokens where they mean to.
* ``decode(ids)`` never raises on an id: an id outside ``[0, vocab_size)`` (a model whose
  embedding is padded past the tokenizer's vocabulary can emit one) decodes to U+FFFD.
* ``encode_array(text)`` is the fast path used on whole corpora: a numpy array, vectorised for
  char/byte, ``encode_batch`` over safe chunks for Hugging Face tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritlm.errors import ConfigError, FormatError, TritlmError

log = logging.getLogger(__name__)

CONFIG_FILE = "tokenizer_config.json"
CHAR_VOCAB_FILE = "chars.json"
HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
REPLACEMENT = "\ufffd"


def _hash(kind: str, payload: Any) -> str:
    blob = json.dumps([kind, payload], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("ascii")).hexdigest()[:16]


def _write_config(d: Path, tok: Tokenizer) -> None:
    cfg: dict[str, Any] = {"kind": tok.kind, "vocab_size": tok.vocab_size}
    if tok.chat_template:  # kept with the vocabulary, so a fine-tuned model chats like its source
        cfg["chat_template"] = tok.chat_template
    (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def _valid_runs(ids: Sequence[int], vocab_size: int) -> Iterator[list[int] | None]:
    """Runs of in-vocabulary ids, with None for each out-of-range id (decoded as U+FFFD)."""
    run: list[int] = []
    for i in ids:
        i = int(i)
        if 0 <= i < vocab_size:
            run.append(i)
        else:
            if run:
                yield run
                run = []
            yield None
    if run:
        yield run


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses set ``kind`` and implement the abstract methods."""

    kind: str = ""
    bos_id: int | None = None
    eos_id: int | None = None
    # A Jinja chat template that came with the vocabulary (a transformers tokenizer_config.json);
    # not part of the fingerprint: it changes how chats are rendered, not how text tokenizes.
    chat_template: str | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write everything needed to reload this tokenizer with :func:`load_tokenizer`."""

    @abstractmethod
    def _vocab_payload(self) -> Any:
        """A JSON-able description of the vocabulary, hashed by :meth:`fingerprint`."""

    def encode_array(self, text: str) -> np.ndarray:
        """``encode(text)`` as an int64 array; subclasses override with faster paths."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of the kind and vocabulary (cached: tokenizers are immutable)."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            fp = self.__dict__["_fingerprint"] = _hash(self.kind, self._vocab_payload())
        return fp

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"


# ---- characters ---------------------------------------------------------------------------------
class CharTokenizer(Tokenizer):
    """nanoGPT's character tokenizer: id = rank of the character in the sorted set of the corpus.

    A character outside the vocabulary raises :class:`TritlmError` naming it (and its position):
    silently mapping it to some reserved id would train or prompt the model on text it never sees,
    so the user is told to pick the ``byte`` tokenizer for open-ended text instead.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars or any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ConfigError("a char tokenizer needs a non-empty list of distinct single characters")
        self.chars: list[str] = sorted(chars)
        # Sorted code points: encoding is one vectorised searchsorted over the text's code points.
        self._cps = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise ConfigError("cannot build a char tokenizer from empty text")
        cps = np.unique(_code_points(text))
        return cls(chr(int(c)) for c in cps)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        cps = _code_points(text)
        idx = np.searchsorted(self._cps, cps)
        bad = (idx >= len(self._cps)) | (self._cps[np.minimum(idx, len(self._cps) - 1)] != cps)
        if bad.any():
            pos = int(np.argmax(bad))
            ch = chr(int(cps[pos]))
            raise TritlmError(f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in this char "
                              f"tokenizer's vocabulary of {self.vocab_size} characters; use the 'byte' "
                              "tokenizer for arbitrary text")
        return idx.astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        ok = (a >= 0) & (a < self.vocab_size)
        cps = np.where(ok, self._cps[np.where(ok, a, 0)], ord(REPLACEMENT)).astype("<u4")
        return cps.tobytes().decode("utf-32-le", errors="surrogatepass")

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CHAR_VOCAB_FILE).write_text(json.dumps(self.chars, ensure_ascii=True) + "\n")
        _write_config(d, self)

    def _vocab_payload(self) -> Any:
        return self.chars


def _code_points(text: str) -> np.ndarray:
    # surrogatepass: a str may hold lone surrogates; they are characters like any other here.
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


# ---- bytes --------------------------------------------------------------------------------------
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus EOS = 256: any text, no training, no unknown tokens."""

    kind = "byte"
    eos_id = 256

    @property
    def vocab_size(self) -> int:
        return 257

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(np.int64)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes decoded with errors="replace"; EOS decodes to nothing, other ids to U+FFFD."""
        if isinstance(ids, list) and len(ids) <= 32 and all(type(i) is int and 0 <= i <= 255 for i in ids):
            # the incremental detokeniser's few ids, twice a token per sequence: numpy's setup
            # was ~8 us of each call (125M, 8 sequences: ~0.13 ms of a ~2.7 ms step)
            return bytes(ids).decode("utf-8", errors="replace")
        out: list[str] = []
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        a = a[a != self.eos_id]
        bad = (a < 0) | (a > 255)
        if not bad.any():
            return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
        start = 0
        for pos in np.flatnonzero(bad).tolist():
            out.append(a[start:pos].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
            out.append(REPLACEMENT)
            start = pos + 1
        out.append(a[start:].astype(np.uint8).tobytes().decode("utf-8", errors="replace"))
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_config(d, self)

    def _vocab_payload(self) -> Any:
        return {"bytes": 256, "eos": self.eos_id}


# ---- Hugging Face tokenizers --------------------------------------------------------------------
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
# Long texts are cut into chunks for encode_batch (parallel in Rust) only where the cut cannot
# change the ids: just before a whitespace character that follows a non-whitespace one ("x| y",
# "x|\n\n"). No pre-token of the whitelisted pre-tokenizers below holds a non-space followed by a
# space (GPT-2 and tiktoken-style regexes attach spaces only in front of words, and their
# `\s+(?!\S)` look-ahead only acts inside a whitespace run, which a cut never splits), so such a
# spot is always a pre-token boundary and the chunks encode to exactly the ids of the whole text.
# Anything else (Metaspace / prefix spaces, which change every input's start; unknown Split
# regexes; stripping or replacing normalizers) is encoded whole: slower, always exact.
_CUT = re.compile(r"(?<=\S)(?=\s)")
_CHUNK_CHARS = 1 << 16
_WS_SPLITTERS = {"ByteLevel", "Whitespace", "WhitespaceSplit", "BertPreTokenizer", "Split"}
_SAFE_PRE = _WS_SPLITTERS | {"Sequence", "Punctuation", "Digits"}
_SAFE_NORM = {"Sequence", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "BertNormalizer"}
_TIKTOKEN_SIGNATURE = r"\s+(?!\S)"


def _chunks(text: str, size: int | None = None) -> list[str]:
    size = _CHUNK_CHARS if size is None else size  # read at call time so tests can shrink it
    out, pos, n = [], 0, len(text)
    while pos < n:
        m = _CUT.search(text, pos + size) if pos + size < n else None
        end = m.start() if m else n
        out.append(text[pos:end])
        pos = end
    return out


def _typed_nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if "type" in node:
            yield node
        for v in node.values():
            yield from _typed_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _typed_nodes(v)


def _chunk_safe(spec: dict[str, Any]) -> bool:
    """Whether a tokenizer.json's pipeline gives the same ids for chunks cut by ``_CUT``."""
    splits_ws = False
    for n in _typed_nodes(spec.get("pre_tokenizer")):
        t = n["type"]
        if t not in _SAFE_PRE or n.get("add_prefix_space") is True:
            return False
        if t == "Split":
            pattern = n.get("pattern") or {}
            if (_TIKTOKEN_SIGNATURE not in str(pattern.get("Regex", "")) or n.get("invert")
                    or n.get("behavior") != "Isolated"):
                return False
        if t in _WS_SPLITTERS and n.get("use_regex", True):
            splits_ws = True
    if not splits_ws:
        return False  # whitespace stays inside pre-tokens: a cut could change the merges
    if any(n["type"] not in _SAFE_NORM for n in _typed_nodes(spec.get("normalizer"))):
        return False
    for a in spec.get("added_tokens") or []:
        c = str(a.get("content", ""))
        # rstrip swallows the whitespace after the token; mixed tokens could straddle a cut.
        if a.get("rstrip") or (re.search(r"\s", c) and re.search(r"\S", c)):
            return False
    return True


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (a ``tokenizer.json``), e.g. GPT-2's byte-level BPE."""

    kind = "hf"

    def __init__(self, tok: Any):
        self.tok = tok
        # Some tokenizer.json files enable truncation or padding; both would corrupt a corpus.
        tok.no_truncation()
        tok.no_padding()
        self._chunkable = _chunk_safe(json.loads(tok.to_str()))
        specials = {str(t.content): i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.eos_id = next((specials[n] for n in EOS_NAMES if n in specials), None)
        self.bos_id = next((specials[n] for n in BOS_NAMES if n in specials), None)
        if self.bos_id is None and self.eos_id is not None and "<|endoftext|>" in specials:
            self.bos_id = self.eos_id  # GPT-2's convention: one token both ends and starts a document

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as _HF

        p = Path(path)
        if not p.is_file():
            raise FormatError(f"tokenizer file not found: {p}")
        try:
            tok = _HF.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for bad JSON
            raise FormatError(f"{p} is not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        return cls(tok)

    @classmethod
    def train_bpe(cls, texts_or_files: str | Path | Iterable[str | Path], vocab_size: int,
                  special_tokens: Sequence[str] = ("<|endoftext|>",)) -> HFTokenizer:
        """Train a byte-level BPE (GPT-2 style: any text encodes, no unknown token).

        ``texts_or_files``: a ``str`` is text, a ``Path`` is a corpus file or folder (read with
        :func:`tritlm.data.corpus.read_corpus`); or an iterable mixing both. Special tokens take
        ids 0.. in order; the first is EOS (and BOS). ``vocab_size`` counts the 256 byte tokens and
        the specials; a text too small to supply that many merges gives a smaller vocabulary.
        """
        from tokenizers import Tokenizer as _HF
        from tokenizers import decoders, models, pre_tokenizers, trainers

        from tritlm.data.corpus import read_corpus

        specials = list(special_tokens)
        if vocab_size < 256 + len(specials):
            raise ConfigError(f"a byte-level BPE vocabulary needs at least {256 + len(specials)} tokens "
                              f"(256 bytes + {len(specials)} special), not {vocab_size}")
        items = [texts_or_files] if isinstance(texts_or_files, (str, Path)) else list(texts_or_files)

        def pieces() -> Iterator[str]:
            for it in items:
                yield from _chunks(read_corpus(it) if isinstance(it, Path) else it)

        tok = _HF(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(pieces(), trainer=trainer)
        got = tok.get_vocab_size(with_added_tokens=True)
        if got < vocab_size:
            log.warning("BPE training stopped at %d tokens (asked for %d): the text is too small", got, vocab_size)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        if not text:
            return np.zeros(0, dtype=np.int64)
        if not self._chunkable or len(text) <= _CHUNK_CHARS:
            return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        encs = self.tok.encode_batch(_chunks(text), add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encs])

    def decode(self, ids: Sequence[int]) -> str:
        # Special tokens are kept so that decode(encode(text)) == text even when the text holds
        # "<|endoftext|>" (TinyStories does); generation stops at EOS before it is printed.
        out = []
        for run in _valid_runs(ids, self.vocab_size):
            out.append(REPLACEMENT if run is None else self.tok.decode(run, skip_special_tokens=False))
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / HF_FILE))
        _write_config(d, self)

    def _vocab_payload(self) -> Any:
        return sorted(self.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])


def train_bpe(texts_or_files: str | Path | Iterable[str | Path], vocab_size: int,
              special_tokens: Sequence[str] = ("<|endoftext|>",)) -> HFTokenizer:
    """Train a byte-level BPE with Hugging Face ``tokenizers``; see :meth:`HFTokenizer.train_bpe`."""
    return HFTokenizer.train_bpe(texts_or_files, vocab_size, special_tokens)


# ---- SentencePiece ------------------------------------------------------------------------------
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (LLaMA / Mistral style); BOS/EOS come from the model.

    Text is encoded whole, never chunked: SentencePiece adds a dummy prefix space to every input,
    so cutting a corpus into pieces would change the ids at each cut.
    """

    kind = "sentencepiece"

    def __init__(self, proto: bytes, source: str = "<bytes>"):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises various types on a bad proto
            raise FormatError(f"{source} is not a valid SentencePiece model ({e})") from None
        self._proto = proto
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        from tritlm.safe_json import read_regular

        return cls(read_regular(path, "SentencePiece model"), str(path))

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        # sentencepiece raises IndexError on an out-of-range id; decode the valid runs around it.
        return "".join(REPLACEMENT if run is None else self.sp.decode(run)
                       for run in _valid_runs(ids, self.vocab_size))

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / SP_FILE).write_bytes(self._proto)
        _write_config(d, self)

    def _vocab_payload(self) -> Any:
        return self.sp.id_to_piece(list(range(self.vocab_size)))
