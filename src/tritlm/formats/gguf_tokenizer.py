"""Tokenizer metadata of GGUF files: tritlm tokenizers to ``tokenizer.ggml.*`` keys and back."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from tritlm.errors import FormatError

log = logging.getLogger(__name__)


def tokenizer_kv(tok: Any, vocab_size: int) -> dict[str, Any]:
    """llama.cpp vocabulary keys plus tritlm's own copy of the tokenizer (for an exact import)."""
    from tritlm.formats.hf_tokenizer import _bytes_to_unicode, to_hf_tokenizer

    if tok is None:
        return {}
    kv: dict[str, Any] = {"tritlm.tokenizer.kind": tok.kind}
    tokens: list[str] = []
    types: list[int] = []
    if tok.kind == "sentencepiece":
        import base64

        kv["tritlm.tokenizer.data"] = base64.b64encode(tok._proto).decode("ascii")
        sp = tok.sp
        kv["tokenizer.ggml.model"] = "llama"
        for i in range(sp.get_piece_size()):
            tokens.append(sp.id_to_piece(i))
            types.append(3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1)
        kv["tokenizer.ggml.scores"] = np.asarray([sp.get_score(i) for i in range(len(tokens))], dtype="<f4")
    else:
        t = to_hf_tokenizer(tok)
        spec = json.loads(t.to_str())
        if tok.kind == "char":
            kv["tritlm.tokenizer.data"] = json.dumps(tok.chars)
            b2u = _bytes_to_unicode()
            # llama.cpp's gpt2 vocab holds byte-level strings; multi-byte characters would need merges
            # we do not write, so llama.cpp cannot *encode* them (decoding is exact).
            tokens = ["".join(b2u[b] for b in c.encode("utf-8")) for c in tok.chars]
            types = [1] * len(tokens)
            merges: list[str] = []
        else:
            if tok.kind == "hf":
                kv["tritlm.tokenizer.data"] = t.to_str()
            if spec.get("model", {}).get("type") != "BPE":
                log.warning("gguf: tokenizer model %s is not BPE: no llama.cpp vocabulary written",
                            spec.get("model", {}).get("type"))
                return kv
            vocab = t.get_vocab(with_added_tokens=True)
            inv = {i: s for s, i in vocab.items()}
            tokens = [inv.get(i, f"[UNUSED{i}]") for i in range(t.get_vocab_size(with_added_tokens=True))]
            special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
            types = [3 if i in special else 1 for i in range(len(tokens))]
            merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        kv["tokenizer.ggml.model"] = "gpt2"
        kv["tokenizer.ggml.pre"] = "default"
        kv["tokenizer.ggml.merges"] = merges
    if len(tokens) > vocab_size:
        raise FormatError(f"gguf: the tokenizer has {len(tokens)} tokens, the model only {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding padded past the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(5)
    kv["tokenizer.ggml.tokens"] = tokens
    kv["tokenizer.ggml.token_type"] = np.asarray(types, dtype="<i4")
    if tok.bos_id is not None:
        kv["tokenizer.ggml.bos_token_id"] = int(tok.bos_id)
    if tok.eos_id is not None:
        kv["tokenizer.ggml.eos_token_id"] = int(tok.eos_id)
    kv["tokenizer.ggml.add_bos_token"] = False
    return kv


def tokenizer_from_kv(kv: dict[str, Any]):
    from tritlm.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, SentencePieceTokenizer

    kind, data = kv.get("tritlm.tokenizer.kind"), kv.get("tritlm.tokenizer.data")
    if kind is not None and (not isinstance(kind, str) or kind not in ("byte", "char", "hf", "sentencepiece")):
        # refused here, not later as an AttributeError of a tokenizer that never loaded
        raise FormatError(f"gguf: unknown tokenizer kind {str(kind)[:40]!r} in tritlm.tokenizer.kind "
                          "(byte, char, hf, sentencepiece)")
    try:
        if kind == "byte":
            return ByteTokenizer()
        if kind == "char":
            return CharTokenizer(json.loads(data))
        if kind == "hf":
            from tokenizers import Tokenizer

            return HFTokenizer(Tokenizer.from_str(data))
        if kind == "sentencepiece":
            import base64

            return SentencePieceTokenizer(base64.b64decode(data))
    except Exception as e:  # noqa: BLE001 - a corrupt embedded tokenizer: say so, keep the model
        raise FormatError(f"gguf: the embedded {kind} tokenizer is corrupt ({str(e)[:120]})") from None
    if "tokenizer.ggml.tokens" in kv:
        log.warning("gguf: the llama.cpp vocabulary is not converted back; loaded without a tokenizer")
    return None
