"""``tritlm chat``: an interactive REPL with history and a simple plain-text chat template.

The template is plain text so it encodes with any tokenizer (a character-level Tiny Shakespeare
model has no ``<|...|>`` characters); it is the same as the server's default::

    System: You are terse.
    User: Hello
    Assistant: Hi.
    User: How are you?
    Assistant:

A turn ends at EOS or when the model starts the next turn (``\\nUser:`` / ``\\nSystem:``). With the
packed engine each turn's prompt extends the previous one, so only the new text is prefilled (the
engine reuses its cache prefix).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

import torch

from tritlm.infer.sampling import Sampler, SamplingParams, StopStrings

log = logging.getLogger(__name__)

TURN_STOPS = ("\nUser:", "\nSystem:")


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    text = "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


@dataclass
class ChatSession:
    """Chat state over a loaded model (``tritlm.load``): history, template, streaming replies."""

    model: object
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.7, top_k=40))
    max_tokens: int = 256
    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def _ids(self, text: str) -> list[int]:
        tok = self.model.tokenizer
        ids = tok.encode(text)
        ctx = self.model.config.max_seq_len - self.max_tokens
        while len(ids) > ctx and len(self.messages) > 2:  # forget the oldest turns, keep the system prompt
            drop = 1 if self.messages[0]["role"] == "system" else 0
            del self.messages[drop:drop + 2]
            ids = tok.encode(render(self.messages))
        return ids[-ctx:] if ctx > 0 else ids

    def reply(self, user: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add the user's message, stream the assistant's reply through ``on_text``, return it."""
        self.messages.append({"role": "user", "content": user})
        ids = self._ids(render(self.messages))
        tok = self.model.tokenizer
        stops = StopStrings(TURN_STOPS + tuple(self.params.stop))
        eos = tok.eos_id
        out: list[int] = []
        shown, text, safe, stopped = "", "", "", False
        for t in self._stream(ids, eos):
            if eos is not None and t == eos:
                break
            out.append(t)
            text = tok.decode(out).lstrip(" ")  # the space after "Assistant:" is template, not reply
            safe, stopped = stops.push(text)
            if on_text and len(safe) > len(shown):
                on_text(safe[len(shown):])
                shown = safe
            if stopped:
                break
        text = safe if stopped else text
        if on_text and len(text) > len(shown):
            on_text(text[len(shown):])
        self.messages.append({"role": "assistant", "content": text})
        return text

    def _stream(self, ids: list[int], eos: int | None) -> Iterator[int]:
        eng = getattr(self.model, "engine", None)
        if eng is not None:
            sampler = Sampler(self.params, prompt_len=len(ids), stop_ids={eos} if eos is not None else None,
                              max_tokens=self.max_tokens)
            with eng.lock:
                yield from eng.generate(ids, self.max_tokens, self.params, sampler=sampler)
        else:
            yield from self.model.generate_ids(ids, self.max_tokens, self.params)


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
