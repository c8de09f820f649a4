"""Loading a saved tokenizer (folder, ``tokenizer.json``, ``.model``) and building one from a spec
string (``char``, ``byte``, ``bpe:<vocab>``, a path)."""

from __future__ import annotations

import re
from pathlib import Path

from tritlm.data.tokenizer import (
    CHAR_VOCAB_FILE,
    CONFIG_FILE,
    HF_FILE,
    SP_FILE,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    train_bpe,
)
from tritlm.errors import ConfigError, FormatError
from tritlm.safe_json import read_json


def _load_dir(d: Path) -> Tokenizer:
    tok = _load_dir_vocab(d)
    tok.chat_template = _chat_template(d)
    return tok


def _chat_template(d: Path) -> str | None:
    """The chat template saved with a tokenizer: ``chat_template.jinja`` or the ``chat_template``
    string of ``tokenizer_config.json`` (ours or a transformers one)."""
    jf = d / "chat_template.jinja"
    if jf.is_file():
        return jf.read_text()
    if not (d / CONFIG_FILE).is_file():
        return None
    try:
        cfg = read_json(d / CONFIG_FILE)
    except FormatError:  # a template is optional; the vocabulary's own loader reports a bad file
        return None
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    return t if isinstance(t, str) and t.strip() else None


def _load_dir_vocab(d: Path) -> Tokenizer:
    cfg_path = d / CONFIG_FILE
    kind = None
    if cfg_path.is_file():
        cfg = read_json(cfg_path)
        # An HF model folder has its own tokenizer_config.json without our "kind": fall through.
        kind = cfg.get("kind") if isinstance(cfg, dict) else None
    if kind == "char":
        chars = read_json(d / CHAR_VOCAB_FILE)
        try:
            return CharTokenizer(chars)
        except (ValueError, TypeError, ConfigError) as e:
            raise FormatError(f"{d / CHAR_VOCAB_FILE} is missing or corrupt ({e})") from None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf" or (kind is None and (d / HF_FILE).is_file()):
        return HFTokenizer.from_file(d / HF_FILE)
    if kind == "sentencepiece" or (kind is None and (d / SP_FILE).is_file()):
        return SentencePieceTokenizer.from_file(d / SP_FILE)
    if kind is not None:
        raise FormatError(f"{cfg_path}: unknown tokenizer kind {kind!r}")
    models = sorted(d.glob("*.model"))
    if len(models) == 1:
        return SentencePieceTokenizer.from_file(models[0])
    raise FormatError(f"{d} holds no tokenizer ({CONFIG_FILE}, {HF_FILE} or a .model file)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a folder written by ``save``, a ``tokenizer.json``, a SentencePiece
    ``.model``, or a folder holding one of those. FormatError if missing or corrupt."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"tokenizer not found: {p}")
    if p.is_dir():
        return _load_dir(p)
    if p.name == CONFIG_FILE:
        return _load_dir(p.parent)
    if p.suffix in (".json", ".model"):
        tok = HFTokenizer.from_file(p) if p.suffix == ".json" else SentencePieceTokenizer.from_file(p)
        tok.chat_template = _chat_template(p.parent)  # a transformers folder keeps its template beside it
        return tok
    raise FormatError(f"{p} is not a tokenizer file (expected a tokenizer.json, a .model or a folder)")


_BPE_SPEC = re.compile(r"^bpe:(\d+)$")


def build_tokenizer(spec: str, text: str | None = None) -> Tokenizer:
    """``"char"`` | ``"byte"`` | ``"bpe:<vocab_size>"`` | a path (see :func:`load_tokenizer`).

    ``char`` and ``bpe`` are built from ``text`` (the training corpus), which they require.
    """
    s = spec.strip()
    if s == "byte":
        return ByteTokenizer()
    if s == "char" or s.startswith("bpe"):
        m = _BPE_SPEC.match(s)
        if s != "char" and not m:
            raise ConfigError(f"bad tokenizer spec {s!r}: write bpe:<vocab_size>, e.g. bpe:4096")
        if text is None:
            raise ConfigError(f"tokenizer {s!r} is built from the corpus, and no text was given")
        return CharTokenizer.from_text(text) if m is None else train_bpe(text, int(m.group(1)))
    p = Path(s).expanduser()
    if p.exists() or "/" in s or "\\" in s or p.suffix in (".json", ".model"):
        return load_tokenizer(p)
    raise ConfigError(f"unknown tokenizer {s!r}: expected char | byte | bpe:<vocab_size> | a tokenizer path")
