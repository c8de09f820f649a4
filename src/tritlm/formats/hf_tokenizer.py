"""Tokenizers for transformers folders: an exact ``tokenizer.json`` for every tritlm tokenizer kind
but SentencePiece (written as ``tokenizer.model``), plus tritlm's own copy for an exact import."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRITLM_TOK_DIR = "tritlm_tokenizer"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def to_hf_tokenizer(tok: Any):
    """A ``tokenizers.Tokenizer`` that encodes exactly like ``tok``, or None (SentencePiece).

    * ``hf``: itself.
    * ``byte``: byte-level BPE without merges whose vocabulary maps byte b to id b, plus
      ``<|endoftext|>`` = 256 (our EOS): every text encodes to its UTF-8 bytes, as ours does.
    * ``char``: a BPE without merges or pre-tokenizer over our characters (id = our id) with a
      Fuse decoder. A character outside the vocabulary is dropped by it, where ours raises.
    """
    kind = getattr(tok, "kind", None)
    if kind == "hf":
        return tok.tok
    if kind not in ("byte", "char"):
        return None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if kind == "byte":
        b2u = _bytes_to_unicode()
        t = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        t.decoder = decoders.ByteLevel()
        t.add_special_tokens(["<|endoftext|>"])
        return t
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
    t.decoder = decoders.Fuse()
    return t


def _tokenizer_config(tok: Any) -> dict[str, Any]:
    def name(i):
        if i is None:
            return None
        try:
            return tok.tok.id_to_token(i) if tok.kind == "hf" else tok.sp.id_to_piece(i)
        except Exception:  # noqa: BLE001 - names are a convenience for AutoTokenizer only
            return None
    if tok.kind == "sentencepiece":
        d = {"tokenizer_class": "LlamaTokenizer"}
    else:
        d = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.kind == "byte":
        d["eos_token"] = "<|endoftext|>"
    elif tok.kind in ("hf", "sentencepiece"):
        for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
            if name(i) is not None:
                d[key] = name(i)
    d["model_max_length"] = 1 << 30
    if tok.chat_template:
        d["chat_template"] = tok.chat_template
    return d


def save_hf_tokenizer(tok: Any, out: Path) -> None:
    if tok is None:
        return
    t = to_hf_tokenizer(tok)
    if t is not None:
        t.save(str(out / "tokenizer.json"))
    elif tok.kind == "sentencepiece":
        (out / "tokenizer.model").write_bytes(tok._proto)
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n")
    tok.save(out / TRITLM_TOK_DIR)



def load_hf_folder_tokenizer(p: Path):
    from tritlm.data import load_tokenizer

    if (p / TRITLM_TOK_DIR).is_dir():
        return load_tokenizer(p / TRITLM_TOK_DIR)
    for f in ("tokenizer.json", "tokenizer.model"):
        if (p / f).is_file():
            return load_tokenizer(p / f)
    log.warning("hf: %s has no tokenizer.json or tokenizer.model; loaded without a tokenizer", p)
    return None
