"""Text out of a token stream: incremental detokenisation and the stop-string matcher.

Every front end (API, CLI, chat, server) gets its text through these two, driven per sequence by
``infer/generator.py``, so a stop string or a multi-byte character behaves the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class IncrementalDetokenizer:
    """Text deltas from a growing list of ids, correct for byte-level BPE and SentencePiece.

    Decoding one token at a time is wrong for both: a multi-byte character can span tokens, and
    SentencePiece drops a word's leading space at the start of a decode. So each step decodes a
    short window with some context before the new tokens and emits the difference, holding back
    text that ends in U+FFFD (an incomplete character) until the next token completes it
    (the method of Hugging Face text-generation-inference). Each step costs two decodes of a few
    tokens, not a decode of the whole output.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, tid: int) -> str:
        self.ids.append(tid)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character comes out as U+FFFD)."""
        if self.read >= len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopStrings:
    """Cuts streamed text at the first stop string; holds back a tail that may be the start of one.

    ``feed(delta) -> (text safe to show, stopped)``: once a stop string appears (possibly across
    deltas) the text is cut before it; ``flush()`` returns the held-back tail at the end.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        p, self.pending = self.pending, ""
        return p


def bad_word_ids(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Token sequences of banned words (``SamplingParams.banned_sequences``), each word as the
    tokenizer writes it alone and after a space (BPE tokenizers spell the two differently)."""
    out: list[tuple[int, ...]] = []
    for w in words:
        if not w:
            continue
        for variant in (w, " " + w):
            try:
                ids = tuple(tokenizer.encode(variant))
            except Exception:  # noqa: BLE001 - a vocabulary without " ": the word alone is banned
                if variant is w:
                    raise
                continue
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)
