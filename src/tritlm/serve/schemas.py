"""Request bodies of the OpenAI-compatible API, and the OpenAI-style error they turn into.

The models are strict (pydantic strict mode): ``"0.5"`` is not a temperature and ``true`` is not a
``max_tokens``, so a client bug surfaces as a 400 naming the field instead of a silent coercion.
Unknown fields are ignored, as OpenAI does, so that newer clients that send extra fields keep
working. Fields we cannot honour with a non-default value (``n > 1``, ``logprobs``, tools...) are
rejected with a message saying so rather than silently ignored.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class ApiError(Exception):
    """An error the API reports as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_TOKEN_ID = re.compile(r"-?[0-9]{1,12}")

def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_to_api_error(e: ValidationError) -> ApiError:
    """The first problem of a pydantic error as a 400 whose ``param`` is the dotted field path."""
    errs = e.errors(include_url=False)
    first = errs[0] if errs else {"loc": (), "msg": str(e), "type": "value_error"}
    loc = [str(x) for x in first.get("loc", ()) if x != "__root__"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    where = f"'{param}': " if param else ""
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return ApiError(400, f"{where}{msg}{more}", param=param, code="invalid_value")


def _unsupported(param: str, what: str = "") -> ApiError:
    return ApiError(400, f"'{param}' {what + ' ' if what else ''}is not supported by this server",
                    param=param, code="unsupported_parameter")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by both endpoints. Ranges are OpenAI's; top_k, min_p, repetition_penalty, typical_p and
    mirostat* are extensions (llama.cpp's names), penalty_alpha too (Hugging Face's name)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None
    # Extensions (llama.cpp / vLLM names).
    top_k: int = Field(default=0, ge=-1)  # -1 or 0 = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    typical_p: float = Field(default=1.0, gt=0.0, le=1.0)
    mirostat: Literal[0, 2] = 0  # 2 = mirostat v2, its mu carried across the request's tokens
    mirostat_tau: float = Field(default=5.0, ge=0.0, le=100.0)
    mirostat_eta: float = Field(default=0.1, ge=0.0, le=10.0)
    penalty_alpha: float = Field(default=0.0, ge=0.0, le=1.0)  # > 0: contrastive search over top_k (packed models)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(items)}")
        if any(len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            # ASCII digits only: str.isdigit() accepts "²" or "١", which int() then rejects or misreads
            if not _TOKEN_ID.fullmatch(k):
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must lie in [-100, 100], got {b} for token {k}")
        return v

    @field_validator("n")
    @classmethod
    def _check_n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported; send several requests for several completions")
        return v

    def stop_list(self) -> list[str]:
        items = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in items if s]  # an empty stop string would end every completion at once

    def bias_map(self) -> dict[int, float]:
        return {int(k): float(b) for k, b in (self.logit_bias or {}).items()}


class CompletionRequest(_Sampling):
    # str | [str] | [int] | [[int]]; a batch of several prompts is refused (one request per prompt).
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        if self.echo:
            raise _unsupported("echo")
        if self.logprobs is not None:
            raise _unsupported("logprobs")
        if self.best_of not in (None, 1):
            raise _unsupported("best_of")
        if self.suffix:
            raise _unsupported("suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt, as text or token ids; ApiError for a batch or an empty list."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise ApiError(400, "'prompt' is an empty list", param="prompt", code="invalid_value")
        if all(isinstance(x, int) for x in p):
            return list(p)  # type: ignore[arg-type]
        if len(p) > 1:
            raise ApiError(400, f"'prompt' holds {len(p)} prompts; batched prompts are not supported, "
                           "send one request per prompt", param="prompt", code="invalid_value")
        return p[0]  # type: ignore[return-value]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("'messages' must hold at least one message")
        return v

    def check_supported(self) -> None:
        if self.logprobs or self.top_logprobs:
            raise _unsupported("logprobs" if self.logprobs else "top_logprobs")
        if self.tools:
            raise _unsupported("tools", "(function calling)")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format {'type': 'text'} is supported",
                           param="response_format", code="unsupported_value")

    def limit(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name for max_tokens; it wins when both are given.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
