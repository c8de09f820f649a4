"""The Python API: ``m = tritlm.load(path)``; ``m.logits(ids)``; ``m.generate(prompt, ...)``;
``export_model(src, fmt, out)``; ``quantize(src, out, bits=...)``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tritlm.errors import ConfigError, FormatError
from tritlm.formats.detect import load_interop, write_by_suffix, write_format
from tritlm.infer.generator import Event, Request, generate
from tritlm.infer.runtimes import Runtime, runtime_for
from tritlm.infer.sampling import SamplingParams
from tritlm.infer.text import bad_word_ids
from tritlm.model.transformer import Transformer

MAX_BATCH = 8  # prompts generate(list) runs at once; more wait for a free slot


@dataclass
class LoadedModel:
    """A model ready for inference, whatever format it came from."""

    model: Transformer
    tokenizer: Any
    path: Path
    source: str  # "checkpoint" | "packed" | "hf" | "gguf" | "1bit"
    # The packed CPU runtime (tritlm.infer.engine.Engine) for source == "packed": ``model`` is then
    # its runtime Transformer (the same forward, packed Linear kinds swapped in), and logits /
    # generate go through the engine (its KV cache slots and fused decode step).
    engine: Any = None

    @property
    def config(self):
        return self.model.cfg

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits of shape [len(ids), vocab] for one sequence of token ids."""
        if len(ids) == 0:
            raise ValueError("ids must not be empty")
        if self.engine is not None:
            with self.engine.lock:
                return self.engine.logits(list(ids)).clone()
        if len(ids) > self.model.cfg.max_seq_len:
            raise ValueError(f"{len(ids)} tokens exceed the model's context of {self.model.cfg.max_seq_len}")
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.model.embed_tokens.weight.device)
        out, _ = self.model(x)
        return out[0].float().cpu()

    def runtime(self, slots: int = 1) -> Runtime:
        """The model's runtime for the generator (``infer/runtimes.py``), with ``slots`` sequence slots."""
        return runtime_for(self, slots)

    def events(self, reqs: Sequence[Request], text: bool = True, draft: LoadedModel | None = None,
               draft_k: int = 4) -> Iterator[Event]:
        """The one generation path's events for ``reqs`` (``infer/generator.py``), several at once
        (up to MAX_BATCH) on one runtime; ``text``: detokenise (and so apply stop strings).
        ``draft``: a smaller packed model sharing the vocabulary, for speculative decoding of one
        request (``infer/speculative.py``; ``draft_k`` proposals a round). A request with
        ``penalty_alpha`` > 0 runs contrastive search (packed models).

        A packed model's engine lock is held until the iterator ends or is closed: its cache slots
        are this generation's until then."""
        eos = self.tokenizer.eos_id
        tokenizer = self.tokenizer if text else None
        stop_ids = () if eos is None else (eos,)
        if any(r.penalty_alpha for r in reqs) and (self.engine is None or draft is not None):
            raise ConfigError("contrastive search (penalty_alpha) needs a packed model and no draft model")
        if draft is not None:
            if self.engine is None or draft.engine is None or len(reqs) != 1:
                raise ConfigError("speculative decoding (a draft model) needs packed models and one prompt")
            from tritlm.infer.speculative import speculative_events

            yield from speculative_events(self.engine, draft.engine, reqs[0], tokenizer, stop_ids, draft_k)
            return
        lock = self.engine.lock if self.engine is not None else contextlib.nullcontext()
        with lock:
            rt = self.runtime(min(len(reqs), MAX_BATCH))
            it = generate(rt, reqs, tokenizer, stop_ids=stop_ids)
            try:
                for ev in it:
                    if ev.finish == "error":
                        raise ev.exc if ev.exc is not None else ValueError(ev.error)
                    yield ev
            finally:
                it.close()

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64,
                     params: SamplingParams | None = None) -> Iterator[int]:
        """New token ids of one prompt (streaming), ending with the EOS id if one was sampled.
        Stop strings are text: :meth:`stream` and :meth:`generate` apply them, this does not."""
        for ev in self.events([Request(list(prompt_ids), max_tokens, params or SamplingParams())], text=False):
            if ev.token is not None:
                yield ev.token

    def sampling(self, temperature: float = 0.8, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 typical_p: float = 1.0, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, logit_bias: Mapping[int, float] | None = None,
                 stop: str | Sequence[str] = (), seed: int | None = None, mirostat: int = 0,
                 mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, bad_words: Sequence[str] = (),
                 banned_tokens: Sequence[int] = (), allowed_tokens: Sequence[int] | None = None,
                 must_include: Sequence[int] = ()) -> SamplingParams:
        """:class:`SamplingParams` from the OpenAI / llama.cpp names; ``bad_words`` are text, banned
        as this model's tokenizer spells them."""
        return SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, logit_bias=dict(logit_bias or {}), stop=stop, seed=seed,
            mirostat=mirostat, mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta,
            banned_sequences=bad_word_ids(self.tokenizer, bad_words), banned_tokens=tuple(banned_tokens),
            allowed_tokens=None if allowed_tokens is None else tuple(allowed_tokens),
            must_include=tuple(must_include))

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]
        if not ids:
            raise ValueError("the prompt is empty and the tokenizer has no BOS token")
        return list(ids)

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, *,
               draft: LoadedModel | None = None, draft_k: int = 4, penalty_alpha: float = 0.0,
               **sampling: Any) -> Iterator[str]:
        """The continuation of ``prompt`` as text deltas, as they become safe to show (multi-byte
        characters whole, a possible stop string held back). ``sampling``: see :meth:`sampling`;
        ``draft``: see :meth:`events`; ``penalty_alpha`` > 0: contrastive search over the
        ``top_k`` likeliest tokens (Hugging Face's names; packed models)."""
        params = self.sampling(temperature, **sampling)
        req = Request(self._prompt_ids(prompt), max_tokens, params, penalty_alpha=penalty_alpha)
        for ev in self.events([req], draft=draft, draft_k=draft_k):
            if ev.text:
                yield ev.text

    def generate(self, prompt: str | Sequence[str], max_tokens: int = 64, temperature: float = 0.8, *,
                 draft: LoadedModel | None = None, draft_k: int = 4, penalty_alpha: float = 0.0,
                 **sampling: Any) -> str | list[str]:
        """The continuation of ``prompt`` (without the prompt), cut before the first stop string;
        for a list of prompts, the list of their continuations, generated together (one batched
        decode step for all). ``sampling``: every setting of :meth:`sampling` under its OpenAI
        name (``top_p``, ``frequency_penalty``, ``presence_penalty``, ``logit_bias``, ``stop``,
        ``seed``, ...); each prompt gets its own sampler state (a seed gives the same text alone
        or in a batch). ``draft``: speculative decoding with a smaller model; ``penalty_alpha``:
        contrastive search (:meth:`events`)."""
        params = self.sampling(temperature, **sampling)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        reqs = [Request(self._prompt_ids(p), max_tokens, params, penalty_alpha=penalty_alpha) for p in prompts]
        parts: dict[int, list[str]] = {id(r): [] for r in reqs}
        for ev in self.events(reqs, draft=draft, draft_k=draft_k):
            parts[id(ev.seq.req)].append(ev.text)
        out = ["".join(parts[id(r)]) for r in reqs]
        return out[0] if isinstance(prompt, str) else out


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a
    device that is not there is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    return dev


def load(path: str | Path, device: str = "cpu", kv_dtype: str = "auto") -> LoadedModel:
    """Load any model tritlm can read: a training run or checkpoint folder, a packed folder, a
    GGUF or .1bit file, a transformers folder, or a registry name.

    ``device``: see :func:`resolve_device`. A packed model on CUDA runs the GPU runtime (the
    Triton kernels, ``Engine(backend="triton")``); any other model moves there as it is.
    ``kv_dtype``: a packed model's KV cache (``Engine``: "auto" is fp16 on the CPU runtime, as
    llama.cpp's; "q8" int8 rows with a scale each, half fp16's bytes, on the CPU; "f32" keeps keys
    and values exact, as scoring does).
    """
    from tritlm.formats.native import is_native, load_native
    from tritlm.registry import resolve_path

    dev = resolve_device(device)
    p = resolve_path(path)  # a path, or a name from the model registry (tritlm models)
    if not p.exists():
        raise FormatError(f"no such file or folder: {p}")
    if is_native(p):
        model, tok, ckpt = load_native(p)
        return LoadedModel(model.to(dev), tok, ckpt, "checkpoint")
    from tritlm.formats.packed import is_packed

    if is_packed(p):
        from tritlm.infer.engine import load_engine

        if dev.type == "cpu":
            eng = load_engine(p, kv_dtype=kv_dtype)
        else:
            from tritlm.kernels.triton import require

            require(dev.type)
            eng = load_engine(p, backend="triton", device=dev, kv_dtype=kv_dtype)
        return LoadedModel(eng.model, eng.tokenizer, p, "packed", engine=eng)
    got = load_interop(p)  # GGUF files, .1bit files, transformers folders
    if got is not None:
        return LoadedModel(got[0].to(dev), got[1], p, got[2])
    raise FormatError(f"{p}: not a model format tritlm can read")


def export_model(src: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Load any model tritlm reads as a Transformer and write it as ``fmt``
    (one of :data:`tritlm.formats.detect.EXPORT_FORMATS`); the path written. An existing ``out``
    is refused unless ``overwrite`` (checked before the model loads)."""
    if Path(out).exists() and not overwrite:
        raise FormatError(f"{out} exists; choose another output or pass overwrite=True (--force on the "
                          "command line) to replace it")
    m = load(src)
    if m.engine is not None:
        raise FormatError(f"{src} is a packed runtime folder; export from the training checkpoint instead")
    return write_format(m.model, m.tokenizer, fmt, out, name=str(src))


@dataclass
class QuantizeResult:
    """What :func:`quantize` wrote; perplexities (full precision, quantised) when ``eval_text`` was given."""

    out: Path
    bits: str
    ppl_before: float | None = None
    ppl_after: float | None = None


def quantize(src: str | Path, out: str | Path, bits: str = "ternary",
             eval_text: str | Path | None = None) -> QuantizeResult:
    """Post-training quantisation of a full-precision model, written by ``out``'s suffix
    (``.gguf``: TQ2_0, ``.1bit``, else a transformers folder). ``eval_text``: a held-out text file
    whose perplexity is measured before and after (the ``chunks`` protocol over the first 64
    context lengths of tokens, :func:`tritlm.eval.perplexity.perplexity`)."""
    from tritlm.eval.perplexity import perplexity
    from tritlm.formats.ptq import quantize_model

    m = load(src)
    if m.engine is not None:
        raise FormatError(f"{src} is a packed runtime folder (already ternary)")
    if eval_text and m.tokenizer is None:
        raise FormatError(f"{src} has no tokenizer, and measuring perplexity on {eval_text} needs one")
    q = quantize_model(m.model, bits)
    res = QuantizeResult(Path(out), bits)
    if eval_text:
        from tritlm.data.corpus import read_corpus

        ids = m.tokenizer.encode(read_corpus(eval_text))
        n = 64 * m.model.cfg.max_seq_len
        res.ppl_before, res.ppl_after = (perplexity(x, ids, protocol="chunks", max_tokens=n).ppl
                                         for x in (m.model, q))
    write_by_suffix(q, m.tokenizer, out)
    return res
