"""Turning chat messages into one prompt string: the model's own template, or a plain default.
The one chat template module: ``tritlm chat`` and the server both render through it.

Where a template comes from, first match wins:

1. an explicit file (``tritlm serve / chat --chat-template FILE``, a Jinja template);
2. a ``chat_template`` attribute on the tokenizer (a Jinja string);
3. ``chat_template.jinja`` or the ``chat_template`` key of ``tokenizer_config.json`` in the model's
   ``tokenizer/`` folder or the model folder (the Hugging Face conventions);
4. the default below.

The default is plain text so that it encodes with any tokenizer, including a character-level one
trained on Tiny Shakespeare (which has no ``<``, ``|`` or ``>``)::

    System: You are terse.
    User: Hello
    Assistant: Hi.
    User: How are you?
    Assistant:

Generation then stops at ``"\\nUser:"`` or ``"\\nSystem:"`` (the model starting the next turn)
besides EOS, and the leading space the model writes after ``Assistant:`` is dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tritlm.errors import FormatError

log = logging.getLogger(__name__)

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


class TemplateError(ValueError):
    """The messages cannot be rendered (e.g. the template demands alternating roles)."""


@dataclass
class ChatTemplate:
    """Renders ``[{"role", "content"}, ...]`` into the prompt that ends where the assistant's reply begins."""

    name: str
    stop: tuple[str, ...] = ()
    lstrip_reply: bool = False  # drop whitespace the model writes before the reply's first character

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        raise NotImplementedError


@dataclass
class DefaultChatTemplate(ChatTemplate):
    name: str = "default"
    stop: tuple[str, ...] = ("\nUser:", "\nSystem:")
    lstrip_reply: bool = True

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        lines = [f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"


@dataclass
class JinjaChatTemplate(ChatTemplate):
    """A Hugging Face style Jinja chat template, rendered in Jinja's sandbox."""

    source: str = ""
    bos_token: str = ""
    eos_token: str = ""
    _compiled: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from jinja2 import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # Same environment options as transformers' apply_chat_template, so templates written for
        # it (which rely on trim_blocks/lstrip_blocks and these helpers) render identically.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._compiled = env.from_string(self.source)
        except TemplateSyntaxError as e:
            raise FormatError(f"chat template {self.name!r} is not valid Jinja: {e}") from None

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        from jinja2 import TemplateError as JinjaError

        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except JinjaError as e:
            raise TemplateError(f"the chat template rejected the messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template bug must reach the client as a 400, not a 500
            raise TemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


def _raise(msg: str) -> None:
    raise TemplateError(f"the chat template rejected the messages: {msg}")


def _token_text(tok: Any, tid: int | None) -> str:
    if tid is None:
        return ""
    try:
        return str(tok.decode([tid]))
    except Exception:  # noqa: BLE001 - a tokenizer that cannot decode its own special id: no text
        return ""


def _special_text(v: Any) -> str:
    # tokenizer_config.json writes special tokens either as a string or as an AddedToken dict.
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return ""


def _from_config(cfg_path: Path) -> tuple[str, dict[str, Any]] | None:
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    t = cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return (t, cfg) if isinstance(t, str) and t.strip() else None


def load_chat_template(tokenizer: Any, model_path: str | Path | None = None,
                       override: str | Path | None = None) -> ChatTemplate:
    """The chat template for a model (see the module docstring for the search order)."""
    bos, eos = _token_text(tokenizer, tokenizer.bos_id), _token_text(tokenizer, tokenizer.eos_id)
    if override is not None:
        p = Path(override)
        try:
            src = p.read_text()
        except OSError as e:
            raise FormatError(f"cannot read the chat template {p}: {e}") from None
        return JinjaChatTemplate(name=str(p), source=src, bos_token=bos, eos_token=eos)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return JinjaChatTemplate(name="tokenizer", source=own, bos_token=bos, eos_token=eos)
    if model_path is not None:
        root = Path(model_path)
        for d in (root / "tokenizer", root):
            jf = d / "chat_template.jinja"
            if jf.is_file():
                return JinjaChatTemplate(name=str(jf), source=jf.read_text(), bos_token=bos, eos_token=eos)
            found = _from_config(d / "tokenizer_config.json")
            if found is not None:
                src, cfg = found
                b = _special_text(cfg.get("bos_token")) or bos
                e = _special_text(cfg.get("eos_token")) or eos
                # The config's EOS (e.g. "<|im_end|>") often differs from the tokenizer's document
                # separator: stop on its text too, or the model runs on into a new turn.
                stop = (e,) if e else ()
                return JinjaChatTemplate(name=str(d / "tokenizer_config.json"), source=src, bos_token=b,
                                         eos_token=e, stop=stop)
    log.info("no chat template found with the model: using the plain-text default")
    return DefaultChatTemplate()
