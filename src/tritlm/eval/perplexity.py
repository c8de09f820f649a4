"""Perplexity and bits per byte of a causal LM over a token stream, under three protocols.

* ``hf``: the sliding window of Hugging Face's guide "Perplexity of fixed-length models": windows of
  ``ctx`` tokens starting every ``stride`` tokens; each window scores only the tokens after the
  previous window's end (the others are context, label -100 in the guide), the first window every
  token but its first. Token-weighted: the result is the mean over all scored tokens.
* ``llama.cpp``: ``llama-perplexity``'s: a BOS is put before the stream (when there is one), the
  stream is cut into ``len // ctx`` whole chunks of ``ctx`` tokens, each chunk's first token is
  replaced by the BOS, and only the last ``ctx - ctx // 2 - 1`` targets of each chunk are scored
  (the logits of positions ``ctx // 2 .. ctx - 2``).
* ``chunks``: non-overlapping chunks of ``ctx`` tokens (the last one may be shorter), every token
  after a chunk's first scored (the same windows as ``hf`` with ``stride = ctx``).

Everything is computed in float64 from the logits (``log_softmax`` in float64). Bits per byte is
the total negative log-likelihood in nats / ln 2 / the UTF-8 bytes of the scored tokens (see
:func:`scored_bytes`). docs/eval.md describes the protocols and how they map to the originals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tritlm.errors import ConfigError, FormatError

PROTOCOLS = ("hf", "llama.cpp", "chunks")
# Positions whose log-probabilities are computed at once (float64 [rows, V]): bounds the memory.
_ROWS = 256
# Tokens of left context decoded with each run of scored tokens (see scored_bytes).
_BYTE_MARGIN = 16

Progress = Callable[[int, int], None]  # (windows done, windows in all)


@dataclass
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll``: mean negative log-likelihood (nats) per scored token; ``tokens``:
    tokens scored; ``bits_per_byte``: total nll / ln 2 / ``bytes`` (None without a decoder)."""

    ppl: float
    nll: float
    tokens: int
    bits_per_byte: float | None
    bytes: int | None
    protocol: str
    ctx: int
    stride: int
    windows: int = 0
    nll_sum: float = 0.0  # total nats over the scored tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Window:
    """One forward pass over ``stream[start:end]`` scoring the targets ``stream[score_from:end]``
    (each from the logits of the position before it)."""

    start: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return max(0, self.end - self.score_from)


# ---- windows --------------------------------------------------------------------------------------
def check_args(protocol: str, ctx: int, stride: int | None = None) -> int:
    """Validate ``protocol``, ``ctx`` and ``stride``; the stride used (``hf``: default ``ctx // 2``;
    the other protocols step by ``ctx``)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if not isinstance(ctx, int) or ctx < 2:
        raise ConfigError(f"ctx must be at least 2 tokens, not {ctx}")
    if protocol == "llama.cpp" and ctx < 3:
        raise ConfigError("the llama.cpp protocol needs ctx >= 3 (it scores the targets after ctx/2 + 1)")
    if protocol != "hf":
        if stride is not None and stride != ctx:
            raise ConfigError(f"--stride is for the hf protocol; {protocol} steps by ctx ({ctx})")
        return ctx
    stride = max(1, ctx // 2) if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise ConfigError(f"stride must be at least 1, not {stride}")
    if stride > ctx:
        raise ConfigError(f"stride {stride} is larger than ctx {ctx}: tokens between windows would never be scored")
    return stride


def plan_windows(n: int, protocol: str, ctx: int, stride: int | None = None) -> list[Window]:
    """The windows of a protocol over a stream of ``n`` tokens (for ``llama.cpp``: the stream with
    its leading BOS, if any). Windows that would score nothing are left out."""
    stride = check_args(protocol, ctx, stride)
    out: list[Window] = []
    if protocol == "hf":  # the guide's loop, with trg_len = end - prev_end
        prev_end = 0
        for begin in range(0, n, stride):
            end = min(begin + ctx, n)
            w = Window(begin, end, max(prev_end, begin + 1))  # a window's first token has no context
            if w.scored:
                out.append(w)
            prev_end = end
            if end == n:
                break
    elif protocol == "chunks":
        for begin in range(0, n, ctx):
            w = Window(begin, min(begin + ctx, n), begin + 1)
            if w.scored:
                out.append(w)
    else:  # llama.cpp: whole chunks only, targets after first = ctx // 2
        first = ctx // 2
        out = [Window(i * ctx, (i + 1) * ctx, i * ctx + first + 1) for i in range(n // ctx)]
    return out


def scored_positions(windows: Sequence[Window]) -> list[int]:
    """Every scored target position of the stream, in order (a position may repeat only if the
    windows overlap in their scored parts, which no protocol here does)."""
    return [p for w in windows for p in range(w.score_from, w.end)]


def _runs(windows: Sequence[Window], offset: int) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of scored positions, shifted by ``-offset`` (into text-token indices)."""
    runs: list[tuple[int, int]] = []
    for w in windows:
        a, b = w.score_from - offset, w.end - offset
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


def scored_bytes(ids: Sequence[int], runs: Sequence[tuple[int, int]],
                 decode: Callable[[Sequence[int]], str | bytes], margin: int = _BYTE_MARGIN) -> int:
    """UTF-8 bytes of the text the scored tokens stand for: for each run ``[a, b)`` of scored token
    indices, ``len(decode(ids[c:b])) - len(decode(ids[c:a]))`` in UTF-8 bytes with ``c = a - margin``
    (or 0): decoding with some left context attributes what a boundary merge adds (SentencePiece's
    leading space, byte-fallback pieces) to the token that carries it. ``decode`` returns text, or
    the bytes themselves (:func:`token_bytes_decoder`: exact even where a run boundary splits a
    multi-byte character, which text decoding turns into U+FFFD). For ``hf`` (all tokens but the
    first scored) this is the bytes of the whole text less its first token's."""
    def nbytes(part: Sequence[int]) -> int:
        if not len(part):
            return 0
        out = decode(list(part))
        return len(out) if isinstance(out, bytes) else len(out.encode("utf-8", errors="surrogatepass"))

    total = 0
    for a, b in runs:
        c = max(0, a - margin)
        total += nbytes(ids[c:b]) - nbytes(ids[c:a])
    return total


def token_bytes_decoder(tokenizer: Any) -> Callable[[Sequence[int]], bytes] | None:
    """ids -> the bytes they stand for, for tokenizers whose tokens are byte strings (the byte
    tokenizer; byte-level BPE such as GPT-2's, special tokens as their text); None otherwise (char
    tokens are whole characters, so text decoding is exact for them)."""
    from tritlm.data.tokenizer import ByteTokenizer, HFTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return lambda ids: bytes(i for i in ids if 0 <= i < 256)
    if not isinstance(tokenizer, HFTokenizer):
        return None
    import json

    spec = json.loads(tokenizer.tok.to_str())
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to U+0100 onwards
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    rest = [b for b in range(256) if b not in keep]
    inv = {chr(b): b for b in keep} | {chr(256 + k): b for k, b in enumerate(rest)}
    added = {i: str(t.content) for i, t in tokenizer.tok.get_added_tokens_decoder().items()}
    table: list[bytes | None] = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.tok.id_to_token(i)
        if i in added:
            table.append(added[i].encode("utf-8"))
        elif piece is not None and all(c in inv for c in piece):
            table.append(bytes(inv[c] for c in piece))
        else:
            return None  # not a byte-level vocabulary after all: decode text
    return lambda ids: b"".join(table[i] or b"" for i in ids if 0 <= i < len(table))


# ---- logits functions ----------------------------------------------------------------------------
LogitsFn = Callable[[torch.Tensor], Any]  # [B, T] int64 -> [B, T, V] logits (tensor or array)


def model_context(model: Any) -> int | None:
    """The longest sequence ``model`` takes (a Transformer or a LoadedModel); None if unknown."""
    eng = getattr(model, "engine", None)
    if eng is not None:
        return int(eng.max_len)
    inner = getattr(model, "model", model)
    cfg = getattr(inner, "cfg", None)
    return int(cfg.max_seq_len) if cfg is not None else None


def logits_fn_for(model: Any) -> LogitsFn:
    """A :data:`LogitsFn` for a Transformer, a :class:`~tritlm.api.LoadedModel` (the packed engine
    row by row when it has one) or a callable (returned as is)."""
    eng = getattr(model, "engine", None)
    if eng is not None:
        def run_engine(x: torch.Tensor) -> torch.Tensor:
            with eng.lock:
                return torch.stack([eng.logits(row.tolist()).float() for row in x])
        return run_engine
    inner = getattr(model, "model", model)
    if isinstance(inner, torch.nn.Module):
        @torch.no_grad()
        def run_model(x: torch.Tensor) -> torch.Tensor:
            dev = next(inner.parameters()).device
            return inner(x.to(dev))[0]
        return run_model
    if callable(model):
        return model
    raise TypeError(f"expected a model or a logits function, not {type(model).__name__}")


def resolve_args(model: Any, protocol: str, ctx: int | None, stride: int | None) -> tuple[int, int]:
    """``(ctx, stride)`` for ``model``: ``ctx`` defaults to the model's context and may not exceed it."""
    limit = model_context(model)
    if ctx is None:
        if limit is None:
            raise ConfigError("ctx is required with a logits function")
        ctx = limit
    if limit is not None and ctx > limit:
        raise ConfigError(f"ctx {ctx} is longer than the model's context of {limit} tokens")
    return ctx, check_args(protocol, ctx, stride)


# ---- the evaluation -------------------------------------------------------------------------------
def _as_ids(ids: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(ids, dtype=np.int64) if not isinstance(ids, torch.Tensor) else ids)
    return t.to(torch.long).reshape(-1)


def _nll_sum(logits: torch.Tensor, pos: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of -log softmax(logits[pos])[targets] in float64, ``_ROWS`` positions at a time."""
    pos, targets = pos.to(logits.device), targets.to(logits.device)
    total = 0.0
    for i in range(0, pos.numel(), _ROWS):
        rows = logits[pos[i:i + _ROWS]].to(torch.float64)
        lp = torch.log_softmax(rows, dim=-1).gather(-1, targets[i:i + _ROWS, None])
        total -= float(lp.sum())
    return total


def perplexity(model: Any, ids: Any, *, protocol: str = "hf", ctx: int | None = None, stride: int | None = None,
               bos_id: int | None = None, decode: Callable[[Sequence[int]], str | bytes] | None = None,
               max_tokens: int | None = None, batch_size: int = 1,
               progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of ``model`` over the token ids ``ids`` (the text's tokens, no BOS added).

    ``model``: a Transformer, a :class:`~tritlm.api.LoadedModel` or a ``logits_fn(ids [B, T]) ->
    logits [B, T, V]``. ``ctx``: window length (default: the model's context; required for a
    function). ``stride``: ``hf`` only (default ``ctx // 2``). ``bos_id``: the BOS of the
    ``llama.cpp`` protocol (None: none; a LoadedModel's tokenizer's by default). ``decode``: ids ->
    text or bytes, for bits per byte (default for a LoadedModel: :func:`token_bytes_decoder` of its
    tokenizer, else its ``decode``; None: no bits per byte).
    ``max_tokens``: evaluate the first N tokens only. ``batch_size``: windows of equal length run
    together. ``progress(done, total)``: called with the windows done after each forward pass.
    """
    tok = getattr(model, "tokenizer", None)
    if decode is None and tok is not None:
        decode = token_bytes_decoder(tok) or tok.decode
    if bos_id is None and tok is not None:
        bos_id = tok.bos_id
    ctx, stride = resolve_args(model, protocol, ctx, stride)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    text_ids = _as_ids(ids)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ConfigError(f"max_tokens must be at least 2, not {max_tokens}")
        text_ids = text_ids[:max_tokens]
    if text_ids.numel() < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens, the data has {text_ids.numel()}")
    bos = bos_id if protocol == "llama.cpp" else None
    stream = torch.cat([torch.tensor([bos], dtype=torch.long), text_ids]) if bos is not None else text_ids
    windows = plan_windows(stream.numel(), protocol, ctx, stride)
    if not windows:
        raise ConfigError(f"{text_ids.numel()} tokens are too few for the {protocol} protocol at ctx {ctx}"
                          + (f" (it scores whole chunks of {ctx} tokens only)" if protocol == "llama.cpp" else ""))
    fn = logits_fn_for(model)
    total, count, done = 0.0, 0, 0
    if progress is not None:
        progress(0, len(windows))
    i = 0
    while i < len(windows):
        length = windows[i].end - windows[i].start
        group = [windows[i]]
        while (len(group) < batch_size and i + len(group) < len(windows)
               and windows[i + len(group)].end - windows[i + len(group)].start == length):
            group.append(windows[i + len(group)])
        x = torch.stack([stream[w.start:w.end] for w in group])
        if bos is not None:
            x[:, 0] = bos  # llama.cpp replaces every chunk's first token by BOS
        logits = torch.as_tensor(fn(x))
        if logits.shape[:2] != x.shape:
            raise FormatError(f"the logits function returned shape {tuple(logits.shape)} for input {tuple(x.shape)}")
        for r, w in enumerate(group):
            pos = torch.arange(w.score_from - 1 - w.start, w.end - 1 - w.start)
            total += _nll_sum(logits[r], pos, stream[w.score_from:w.end])
            count += w.scored
        i += len(group)
        done += len(group)
        if progress is not None:
            progress(done, len(windows))
    nll = total / count
    nbytes = None
    if decode is not None:
        nbytes = scored_bytes(text_ids.tolist(), _runs(windows, 1 if bos is not None else 0), decode)
    bpb = total / math.log(2) / nbytes if nbytes else None
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, bits_per_byte=bpb, bytes=nbytes,
                            protocol=protocol, ctx=ctx, stride=stride, windows=len(windows), nll_sum=total)


# ---- data -----------------------------------------------------------------------------------------
def read_eval_ids(data: str | Path, tokenizer: Any) -> np.ndarray:
    """The token ids to evaluate: a text file, ``.gz`` file or corpus folder encoded with
    ``tokenizer``, or the val split of a folder written by ``tritlm tokenize`` (whose tokenizer must
    be ``tokenizer``)."""
    from tritlm.data.corpus import read_corpus
    from tritlm.data.prepare import META_FILE

    p = Path(data)
    if not p.exists():
        raise FormatError(f"no such file or folder: {p}")
    if p.is_dir() and (p / META_FILE).is_file():
        from tritlm.data.loader import TokenData

        td = TokenData(p)
        fp = getattr(tokenizer, "fingerprint", None)
        if fp is not None and td.tokenizer.fingerprint() != fp():
            raise FormatError(f"{p} was tokenised with a different tokenizer than the model's "
                              f"({td.tokenizer.kind}, vocabulary {td.vocab_size}); tokenise the text with the "
                              "model's tokenizer or pass the text file")
        ids = np.asarray(td.array("val"), dtype=np.int64)
    else:
        text = read_corpus(p)
        if not text.strip():
            raise FormatError(f"{p} holds no text")
        ids = np.asarray(tokenizer.encode_array(text) if hasattr(tokenizer, "encode_array")
                         else tokenizer.encode(text), dtype=np.int64)
    if ids.size < 2:
        raise FormatError(f"{p} gives {ids.size} token(s); perplexity needs at least 2")
    return ids


def evaluate(model: Any, data: str | Path, *, protocol: str = "hf", ctx: int | None = None,
             stride: int | None = None, max_tokens: int | None = None, batch_size: int = 1,
             progress: Progress | None = None) -> PerplexityResult:
    """``tritlm eval``: the perplexity of a model (a path / registered name for :func:`tritlm.load`,
    or a LoadedModel) on ``data`` (see :func:`read_eval_ids`)."""
    if not Path(data).exists():
        raise FormatError(f"no such file or folder: {data}")
    if isinstance(model, (str, Path)):
        from tritlm.api import load

        model = load(model, kv_dtype="f32")  # scores are the model's own: no fp16 rounding of K/V
    resolve_args(model, protocol, ctx, stride)  # bad arguments fail before the data is tokenised
    ids = read_eval_ids(data, model.tokenizer)
    return perplexity(model, ids, protocol=protocol, ctx=ctx, stride=stride, max_tokens=max_tokens,
                      batch_size=batch_size, progress=progress)
