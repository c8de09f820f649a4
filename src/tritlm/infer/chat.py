"""``tritlm chat``: an interactive REPL with history, over the one chat template module
(``infer/chat_template.py``: the model's own template, else the server's plain-text default).

A turn ends at EOS or at one of the template's stop strings (the default's ``\\nUser:`` /
``\\nSystem:``: the model starting the next turn). Replies stream through the one generation path
(``infer/generator.py``), so a chat turn gives the same tokens as the same request to the server.
With the packed engine each turn's prompt extends the previous one, so only the new text is
prefilled (the engine reuses its cache prefix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TextIO

import torch

from tritlm.infer.chat_template import ChatTemplate, DefaultChatTemplate
from tritlm.infer.generator import Request
from tritlm.infer.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class ChatSession:
    """Chat state over a loaded model (``tritlm.load``): history, template, streaming replies."""

    model: object
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_k=40))
    max_tokens: int = 256
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    template: ChatTemplate = field(default_factory=DefaultChatTemplate)

    def __post_init__(self):
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def _ids(self) -> list[int]:
        tok = self.model.tokenizer
        ids = tok.encode(self.template.render(self.messages))
        ctx = self.model.config.max_seq_len - self.max_tokens
        while len(ids) > ctx and len(self.messages) > 2:  # forget the oldest turns, keep the system prompt
            drop = 1 if self.messages[0]["role"] == "system" else 0
            del self.messages[drop:drop + 2]
            ids = tok.encode(self.template.render(self.messages))
        return ids[-ctx:] if ctx > 0 else ids

    def reply(self, user: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add the user's message, stream the assistant's reply through ``on_text``, return it."""
        self.messages.append({"role": "user", "content": user})
        params = replace(self.params, stop=tuple(self.template.stop) + tuple(self.params.stop))
        req = Request(self._ids(), self.max_tokens, params, lstrip=self.template.lstrip_reply)
        parts: list[str] = []
        for ev in self.model.events([req]):
            if ev.text:
                parts.append(ev.text)
                if on_text:
                    on_text(ev.text)
        text = "".join(parts)
        self.messages.append({"role": "assistant", "content": text})
        return text


def chat_repl(chat: ChatSession, stdin: TextIO, stdout: TextIO, *, banner: str | None = None,
              prompt: str = "> ") -> None:
    """Read user lines from ``stdin`` until EOF or ``/exit`` (``/quit``), stream each reply to ``stdout``.

    ``/reset`` clears the history (the system prompt stays). When ``stdin`` is a terminal, ``banner``
    (if any) is written first and ``prompt`` before each line.
    """
    interactive = stdin.isatty()
    if interactive and banner:
        stdout.write(banner + "\n")
    while True:
        if interactive:
            stdout.write(prompt)
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            chat.reset()
            continue
        if not line.strip():
            continue

        def emit(s: str) -> None:
            stdout.write(s)
            stdout.flush()

        with torch.no_grad():
            chat.reply(line, emit)
        stdout.write("\n")
