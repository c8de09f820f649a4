"""The Python API: ``m = tritlm.load(path)``; ``m.logits(ids)``; ``m.generate(prompt, ...)``;
``export_model(src, fmt, out)``; ``quantize(src, out, bits=...)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tritlm.errors import FormatError
from tritlm.formats.detect import load_interop, write_by_suffix, write_format
from tritlm.infer.generate import generate_ids
from tritlm.infer.sampling import SamplingParams, StopStrings
from tritlm.model.transformer import Transformer


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

    def generate_ids(self, prompt_ids: list[int], max_tokens: int = 64,
                     params: SamplingParams | None = None):
        eos = self.tokenizer.eos_id
        if self.engine is not None:
            return self.engine.generate_locked(list(prompt_ids), max_tokens, params or SamplingParams(),
                                               stop_ids={eos} if eos is not None else None)
        return generate_ids(self.model, list(prompt_ids), max_tokens, params or SamplingParams(),
                            stop_ids={eos} if eos is not None else None)

    def generate(self, prompt: str, max_tokens: int = 64, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> str:
        """The continuation of ``prompt`` (without the prompt), cut before the first stop string."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed, stop=tuple(stop))
        ids = self.tokenizer.encode(prompt)
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]
        if not ids:
            raise ValueError("the prompt is empty and the tokenizer has no BOS token")
        eos = self.tokenizer.eos_id
        stops = StopStrings(params.stop)
        out: list[int] = []
        gen = self.generate_ids(ids, max_tokens, params)
        try:
            for t in gen:
                if eos is not None and t == eos:
                    break
                out.append(t)
                if stops.stops:
                    text, stopped = stops.push(self.tokenizer.decode(out))
                    if stopped:  # no more tokens: the rest of the generation is never computed
                        return text
        finally:
            if hasattr(gen, "close"):
                gen.close()  # releases the engine lock of a packed model right away
        return self.tokenizer.decode(out)


def load(path: str | Path) -> LoadedModel:
    """Load any model tritlm can read (for now: a training run folder or checkpoint folder)."""
    from tritlm.formats.native import is_native, load_native
    from tritlm.registry import resolve_path

    p = resolve_path(path)  # a path, or a name from the model registry (tritlm models)
    if not p.exists():
        raise FormatError(f"no such file or folder: {p}")
    if is_native(p):
        model, tok, ckpt = load_native(p)
        return LoadedModel(model, tok, ckpt, "checkpoint")
    from tritlm.formats.packed import is_packed

    if is_packed(p):
        from tritlm.infer.engine import load_engine

        eng = load_engine(p)
        return LoadedModel(eng.model, eng.tokenizer, p, "packed", engine=eng)
    got = load_interop(p)  # GGUF files, .1bit files, transformers folders
    if got is not None:
        return LoadedModel(got[0], got[1], p, got[2])
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
