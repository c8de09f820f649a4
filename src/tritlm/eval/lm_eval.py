"""An lm-evaluation-harness model (``--model tritlm``) for every model :func:`tritlm.load` reads.

Importing this module registers the class with lm-eval under the name ``tritlm``; it needs the
``eval`` extra (``lm-eval>=0.4,<0.5``), and nothing else in tritlm imports it.

* From Python: :func:`run_tasks` (``lm_eval.simple_evaluate`` with this model), or
  ``lm_eval.simple_evaluate(model="tritlm", model_args={"path": ...}, ...)`` after importing this
  module, or ``TritlmLM(path=...)`` passed as ``model=``.
* From the shell: ``python -m tritlm.eval.lm_eval run --model tritlm --model_args path=DIR
  --tasks ...`` is lm-eval's own command line with this model registered. The plain ``lm_eval``
  command cannot find it: lm-eval 0.4 looks model names up only in its own table
  (``lm_eval/models/__init__.py``) and reads no entry points.

What it computes, and how it matches lm-eval's ``HFLM`` (``lm_eval/models/huggingface.py``):

* ``loglikelihood``: TemplateLM's encoding (trailing context spaces move to the continuation, the
  pair is encoded whole and split at the context's length, an empty context becomes
  ``prefix_token_id``); ``(context + continuation)[-(max_length + 1):][:-1]`` runs through the
  model (left truncation as HFLM), log-softmax in float32 over the continuation's positions, its
  log-probabilities summed in float64; ``is_greedy`` when every continuation token is the argmax.
  Requests are sorted by length (longest first) and run ``batch_size`` at a time in one forward,
  padded on the right (exact for a causal model: no position sees the padding after it); requests
  whose context + continuation[:-1] are the same tokens share one forward (lm-eval's Collator, as
  HFLM's ``logits_cache``), each read at its own trailing positions.
* ``loglikelihood_rolling``: lm-eval's ``get_rolling_token_windows`` / ``make_disjoint_window``
  over ``max_length``-token windows with ``prefix_token_id`` first, summed per document.
* ``generate_until``: the context encoded and left-truncated to ``max_length - max_gen_toks``,
  then tritlm's own generation (KV cache; the packed runtime's engine for packed folders): greedy
  unless ``do_sample`` with a ``temperature`` > 0 (``top_k`` / ``top_p`` / ``min_p`` /
  ``repetition_penalty`` honoured), until ``max_gen_toks``, EOS or one of the ``until`` strings
  (EOS's text is always one, as in HFLM); the text is cut before the first ``until`` string.
  One request at a time.

Tokens: ``tok_encode`` is the tokenizer's ``encode`` (which adds no special tokens, like a
transformers tokenizer without a BOS post-processor); ``add_bos_token=True`` puts BOS first (what
HFLM does for tokenizers that add BOS, e.g. SentencePiece Llama). ``prefix_token_id`` defaults to
BOS, else EOS; a tokenizer with neither (``char``) needs ``prefix_token_id=`` for empty contexts
and rolling log-likelihoods.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models first: get_model() fills only an empty registry
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from tritlm.infer.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's
AUTO_BATCH_SIZE = 8  # what batch_size="auto" means here (no memory probing)


def _batch_size(b: Any) -> int:
    if b is None:
        return 1
    if isinstance(b, str):
        s = b.strip().lower()
        if s.startswith("auto"):
            log.info("batch_size=%s: tritlm runs %d requests per forward", b, AUTO_BATCH_SIZE)
            return AUTO_BATCH_SIZE
        b = int(s)
    b = int(b)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, not {b}")
    return b


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


@register_model("tritlm")
class TritlmLM(TemplateLM):
    """lm-eval's LM over a :class:`tritlm.api.LoadedModel`.

    Args:
        path: any model ``tritlm.load`` reads (run / checkpoint folder, packed folder, transformers
            folder, ``.gguf``, ``.1bit``, or a registry name); ``pretrained`` is an alias.
        max_length: tokens per forward (default and cap: the model's context).
        batch_size: requests per forward for log-likelihoods ("auto": 8).
        max_gen_toks: default generation length when a task gives none (256, as HFLM).
        add_bos_token: put BOS before every encoded context (default: no special tokens).
        prefix_token_id: the token an empty context / the first rolling window starts from
            (default: BOS, else EOS).
        device: where a non-packed model runs (default: where it was loaded, the CPU; CUDA when
            asked for but unavailable falls back to the CPU, as lm-eval's CLI asks for cuda:0).
        seed: sampling seed for ``do_sample`` generations.
        model: an already loaded ``LoadedModel`` instead of ``path``.
    """

    def __init__(self, path: str | Path | None = None, max_length: int | None = None, batch_size: Any = 1,
                 max_batch_size: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool = False, prefix_token_id: int | None = None, device: str | None = None,
                 seed: int | None = 1234, pretrained: str | Path | None = None, model: Any = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            log.warning("tritlm: ignoring unknown model_args %s", sorted(kwargs))
        del max_batch_size  # lm-eval passes it to every model; there is no automatic batch size here
        if model is None:
            path = path if path is not None else pretrained
            if path is None:
                raise ValueError("the tritlm model needs path=MODEL (model_args path=...)")
            import tritlm

            # exact K/V (no fp16 cache): a score must not depend on the batch size, and the
            # batched log-likelihood forward runs without a cache
            model = tritlm.load(path, kv_dtype="f32")
        self.lm = model
        self.path = str(path if path is not None else getattr(model, "path", ""))
        dev = model.model.embed_tokens.weight.device
        if device is not None and model.engine is not None:
            if torch.device(device).type != "cpu":  # lm-eval's CLI passes cuda:0 unless told otherwise
                log.info("tritlm: a packed model runs on the CPU; device=%s ignored", device)
        elif device is not None:
            dev = torch.device(device)
            if dev.type == "cuda" and not torch.cuda.is_available():
                log.warning("tritlm: device=%s, but CUDA is not available: running on the CPU", device)
                dev = torch.device("cpu")
            model.model.to(dev)
        self._device = dev
        ctx = model.engine.max_len if model.engine is not None else model.model.cfg.max_seq_len
        if max_length is not None:
            max_length = int(max_length)
            if max_length > ctx:
                log.warning("tritlm: max_length %d exceeds the model's context of %d; using %d",
                            max_length, ctx, ctx)
                max_length = ctx
        self._max_length = max_length or ctx
        self.batch_size_per_gpu = _batch_size(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.seed = None if seed is None else int(seed)
        self.tokenizer = model.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: the model has no tokenizer; lm-eval works on text")
        if self.add_bos_token and self.tokenizer.bos_id is None:
            raise ValueError("add_bos_token=True, but the tokenizer has no BOS token")

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        for t in (self.custom_prefix_token_id, self.tokenizer.bos_id, self.tokenizer.eos_id):
            if t is not None:
                return t
        raise ValueError("the tokenizer has neither BOS nor EOS: pass prefix_token_id=<id> in model_args for "
                         "empty contexts and rolling log-likelihoods")

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {"model_path": self.path, "model_source": self.lm.source,
                "model_num_parameters": sum(p.numel() for p in self.lm.model.parameters()),
                "max_length": self.max_length}

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        ids = list(self.tokenizer.encode(string))
        if self.add_bos_token and add_special_tokens is not False and (not ids or ids[0] != self.tokenizer.bos_id):
            ids = [self.tokenizer.bos_id] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        # HFLM decodes with skip_special_tokens=True: drop BOS / EOS the way it would
        drop = {t for t in (self.tokenizer.bos_id, self.tokenizer.eos_id) if t is not None}
        return self.tokenizer.decode([int(t) for t in ids if int(t) not in drop])

    # ------------------------------------------------------------------ the forward
    @torch.no_grad()
    def _logprobs(self, seqs: list[list[int]], keep: list[int]) -> list[torch.Tensor]:
        """float32 log-softmax ``[keep[i], V]`` of the last ``keep[i]`` positions of each sequence:
        one forward, rows padded on the right; the softmax runs over the kept rows only."""
        n = max(len(s) for s in seqs)
        if n > self.max_length:
            raise ValueError(f"a sequence of {n} tokens exceeds max_length {self.max_length}")
        x = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        eng = self.lm.engine
        if eng is not None:  # the packed runtime's Transformer; its engine's lock keeps servers out
            with eng.lock:
                logits, _ = eng.model(x)
                # log_softmax makes new tensors: the runtime reuses its output buffers
                return [torch.log_softmax(logits[i, len(s) - k:len(s)].float(), dim=-1)
                        for i, (s, k) in enumerate(zip(seqs, keep))]
        logits, _ = self.lm.model(x.to(self._device))
        return [torch.log_softmax(logits[i, len(s) - k:len(s)].float(), dim=-1).cpu()
                for i, (s, k) in enumerate(zip(seqs, keep))]

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        res: list[tuple[float, bool]] = []

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _one_token_key(req):
            return req[-2] + req[-1][:-1]

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts", group_fn=_one_token_key)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in re_ord.get_batched(n=self.batch_size):
            inps = []
            for _, ctx, cont in chunk:
                if len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
                if not ctx:
                    raise ValueError("a loglikelihood request needs at least one context token")
                whole = ctx + cont
                if len(whole) > self.max_length + 1:
                    log.warning("context (%d) + continuation (%d) exceed max_length %d: truncating %d tokens "
                                "from the left", len(ctx), len(cont), self.max_length,
                                len(whole) - self.max_length - 1)
                inps.append(whole[-(self.max_length + 1):][:-1])
            lps = self._logprobs(inps, [len(cont) for _, _, cont in chunk])
            for (req_str, ctx_toks, cont_toks), lp in zip(chunk, lps):
                lp = lp.unsqueeze(0)  # [1, cont, V]
                greedy = lp.argmax(dim=-1)
                for request_str, cont, lpc in re_ord.get_cache(req_str=req_str, cxt_toks=ctx_toks,
                                                               cont_toks=cont_toks, logits=lp):
                    ct = torch.tensor(cont, dtype=torch.long).unsqueeze(0)
                    is_greedy = bool((greedy[:, greedy.shape[1] - ct.shape[1]:] == ct).all())
                    ll = torch.gather(lpc[:, lpc.shape[1] - ct.shape[1]:], 2, ct.unsqueeze(-1)).squeeze(-1)
                    answer = (float(ll.double().sum()), is_greedy)  # float64 sum: float32 ulp at -300 is 3e-5
                    res.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[int, tuple[None, list[int], list[int]]]] = []
        for i, (string,) in enumerate(req.args for req in requests):
            toks = self.tok_encode(string)
            got = [(None, *lm_utils.make_disjoint_window(w)) for w in lm_utils.get_rolling_token_windows(
                token_list=toks, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            windows.extend((i, w) for w in got)
        lls = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=True) if windows else []
        out = [0.0] * len(requests)
        for (i, _), (ll, _) in zip(windows, lls):
            out[i] += ll
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    # ------------------------------------------------------------------ generation
    def _sampling(self, kwargs: dict[str, Any]) -> SamplingParams:
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if do_sample and temperature <= 0:
            temperature = 1.0  # transformers' default when sampling without a temperature
        if not do_sample:
            temperature = 0.0
        params = SamplingParams(temperature=temperature, top_k=int(kwargs.pop("top_k", 0) or 0),
                                top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                min_p=float(kwargs.pop("min_p", 0.0) or 0.0),
                                repetition_penalty=float(kwargs.pop("repetition_penalty", 1.0) or 1.0),
                                seed=self.seed)
        kwargs.pop("max_length", None)
        if kwargs:
            log.warning("tritlm: ignoring generation kwargs %s", sorted(kwargs))
        return params

    def _generate_one(self, ids: list[int], max_tokens: int, params: SamplingParams, until: Iterable[str]) -> str:
        until = [u for u in until if u]
        eos = self.tokenizer.eos_id
        out: list[int] = []
        gen = self.lm.generate_ids(ids, max_tokens, params)
        try:
            for t in gen:
                if eos is not None and t == eos:
                    break
                out.append(int(t))
                if until:
                    text = self.tok_decode(out)
                    if any(u in text for u in until):
                        break
        finally:
            if hasattr(gen, "close"):
                gen.close()  # releases a packed engine's lock at once
        return postprocess_generated_text(self.tok_decode(out), until, None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        eos_text = None
        if self.tokenizer.eos_id is not None:
            eos_text = self.tokenizer.decode([self.tokenizer.eos_id]) or None
        res: list[str] = []
        for req in tqdm(requests, disable=disable_tqdm, desc="Running generate_until requests"):
            context, gen_kwargs = req.args
            kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_gen} leaves no room for a context in max_length "
                                 f"{self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=max_ctx)
            if not ids:
                ids = [self.prefix_token_id]
            s = self._generate_one(ids, max_gen, self._sampling(kwargs), until)
            res.append(s)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
        return res


def run_tasks(path: str | Path, tasks: Sequence[str] | str,
              include_path: str | Path | Sequence[str | Path] | None = None, limit: int | float | None = None,
              batch_size: int = 1, **model_args: Any) -> dict:
    """``lm_eval.simple_evaluate`` of the tritlm model at ``path`` on ``tasks`` (task or group
    names; ``include_path``: folders of task YAMLs to add to lm-eval's own). ``limit``: documents
    per task (a float < 1: a fraction). Extra keywords go to :class:`TritlmLM` (``max_length``,
    ``add_bos_token``...). Returns lm-eval's results dict (``results``, ``configs``, ``versions``,
    ``n-samples``, ``config``...), without the per-sample log."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if isinstance(include_path, (list, tuple)):
        include_path = [str(p) for p in include_path]
    elif include_path is not None:
        include_path = str(include_path)
    tm = None
    if include_path is not None:
        # lm-eval's own index (~15k names) takes ~13 s to build on 2 cores: skip it when every name
        # is a plain task of include_path (groups and tags may reach into lm-eval's tasks)
        own = TaskManager(include_path=include_path, include_defaults=False)
        if all(n in own.all_subtasks for n in names):
            tm = own
    if tm is None:
        tm = TaskManager(include_path=include_path)
    out = lm_eval.simple_evaluate(model="tritlm", model_args={"path": str(path), **model_args}, tasks=names,
                                  batch_size=batch_size, limit=limit, task_manager=tm, log_samples=False)
    if out is None:  # only on non-zero ranks of a distributed run
        return {}
    out = dict(out)
    out.pop("samples", None)
    return out


if __name__ == "__main__":  # python -m tritlm.eval.lm_eval run --model tritlm --model_args path=... --tasks ...
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
