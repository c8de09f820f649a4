"""The sampler flags shared by ``tritlm generate`` and ``tritlm chat``: every setting of
:class:`~tritlm.infer.sampling.SamplingParams`, named as the server's request fields."""

from __future__ import annotations

import argparse
import re
from typing import Any

from tritlm.errors import ConfigError


def add_sampling_args(p: argparse.ArgumentParser, *, temperature: float = 0.8, top_k: int = 0,
                      top_p: float = 1.0, repetition_penalty: float = 1.0) -> None:
    g = p.add_argument_group("sampling (OpenAI / llama.cpp names, as the server's request fields; applied in "
                             "llama.cpp's order)")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=top_k, help=f"keep the k most likely tokens; 0 = off (default {top_k})")
    g.add_argument("--top-p", type=float, default=top_p, help=f"nucleus: keep tokens up to this mass (default {top_p})")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--typical-p", type=float, default=1.0, help="locally typical sampling mass; 1 = off")
    g.add_argument("--repetition-penalty", type=float, default=repetition_penalty,
                   help=f"CTRL-style, over prompt and output; 1 = off (default {repetition_penalty})")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI: logit -= count x this, count over the generated tokens")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI: logit -= this for every token generated at least once")
    g.add_argument("--mirostat", type=int, choices=[0, 2], default=0,
                   help="2 = mirostat v2 (its mu carried across tokens; replaces top-k/p, typical, min-p)")
    g.add_argument("--mirostat-tau", type=float, default=5.0, help="mirostat target surprise in bits")
    g.add_argument("--mirostat-eta", type=float, default=0.1, help="mirostat learning rate")
    g.add_argument("--seed", type=int, help="same seed + same settings = same output")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable): output ends before it")
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS to token ID's logit (repeatable; -100 bans, +100 forces)")
    g.add_argument("--bad-word", action="append", default=[], metavar="TEXT",
                   help="never generate TEXT (repeatable; as the tokenizer spells it)")
    g.add_argument("--ban-token", action="append", default=[], type=int, metavar="ID", help="never sample token ID")
    g.add_argument("--allow-token", action="append", type=int, metavar="ID",
                   help="sample only these token ids (repeatable)")
    g.add_argument("--must-include", action="append", default=[], type=int, metavar="ID",
                   help="EOS is banned until token ID was generated (forced before max-tokens runs out)")


def _bias(items: list[str]) -> dict[int, float]:
    out = {}
    for it in items:
        m = re.fullmatch(r"\s*(\d+)\s*[=:]\s*(\S+)\s*", it)
        try:
            if m is None:
                raise ValueError
            out[int(m.group(1))] = float(m.group(2))
        except ValueError:
            raise ConfigError(f"--logit-bias {it!r}: expected ID=BIAS, e.g. 42=-100") from None
    return out


def sampling_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :meth:`tritlm.api.LoadedModel.sampling` from the parsed flags."""
    return {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "min_p": a.min_p,
            "typical_p": a.typical_p, "repetition_penalty": a.repetition_penalty,
            "frequency_penalty": a.frequency_penalty, "presence_penalty": a.presence_penalty,
            "mirostat": a.mirostat, "mirostat_tau": a.mirostat_tau, "mirostat_eta": a.mirostat_eta,
            "seed": a.seed, "stop": tuple(a.stop), "logit_bias": _bias(a.logit_bias),
            "bad_words": tuple(a.bad_word), "banned_tokens": tuple(a.ban_token),
            "allowed_tokens": None if a.allow_token is None else tuple(a.allow_token),
            "must_include": tuple(a.must_include)}


_FLAGS = {"banned_tokens": "--ban-token", "allowed_tokens": "--allow-token"}


def sampling_params(**kw):
    """:class:`~tritlm.infer.sampling.SamplingParams` from command-line flags; its one-line
    error names the flag (``--top-k``) instead of the field (``top_k``). ``bad_words`` (text) are
    checked later, against the model's tokenizer."""
    from tritlm.infer.sampling import SamplingParams

    kw = {k: v for k, v in kw.items() if k != "bad_words"}
    try:
        return SamplingParams(**kw)
    except ConfigError as e:
        m = re.match(r"sampling: (\w+) = (.*)", str(e))
        if m and m.group(1) in kw:
            flag = _FLAGS.get(m.group(1), "--" + m.group(1).replace("_", "-"))
            raise ConfigError(f"{flag} {m.group(2)}") from None
        raise
