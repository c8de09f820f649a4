"""The OpenAI-compatible HTTP API (FastAPI), and running it with uvicorn.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream as server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
``GET /metrics``. Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}``.

Request bodies are parsed by hand (JSON, then a strict pydantic model) rather than through
FastAPI's body parameters, so that every malformed request - bad JSON included - gets the same
OpenAI-style 400 with the offending field in ``param``, instead of FastAPI's own 422 format.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tritlm.errors import TritlmError
from tritlm.heap import freeze_startup_heap
from tritlm.infer.chat_template import ChatTemplate, DefaultChatTemplate, TemplateError, load_chat_template
from tritlm.infer.generator import Request as GenRequest
from tritlm.infer.sampling import SamplingParams
from tritlm.serve.engine import DEFAULT_MAX_BATCH, Backend, Delta, Engine, Finish, Job, QueueFull, backend_for
from tritlm.serve.listen import ServerThread, bind_socket, socket_url  # noqa: F401 - ServerThread: re-exported
from tritlm.serve.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from tritlm.serve.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    _Sampling,
    error_body,
    validation_to_api_error,
)

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 8 * 2**20


@dataclass
class ServeSettings:
    model_name: str = "tritlm"
    api_key: str | None = None
    max_prompt_tokens: int | None = None  # None = the model's context length
    max_tokens_limit: int = 4096
    chat_template: ChatTemplate = field(default_factory=DefaultChatTemplate)
    max_body_bytes: int = MAX_BODY_BYTES
    created: int = field(default_factory=lambda: int(time.time()))


# ---- helpers ----------------------------------------------------------------------------------------
def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_json(request: Any, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object", code="invalid_json")
    return data


INLINE_TOKENIZE_CHARS = 2048  # prompts up to this long are tokenised on the event loop itself

# one encoder for every event: json.dumps with these options builds a new JSONEncoder a call
_SSE_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _sse(obj: Any) -> str:
    return f"data: {_SSE_JSON.encode(obj)}\n\n"


def _usage(f: Finish) -> dict[str, int]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


# ---- the app ----------------------------------------------------------------------------------------
def create_app(backend: Backend, settings: ServeSettings | None = None, *, max_batch: int = DEFAULT_MAX_BATCH,
               max_queue: int = 64, metrics: Metrics | None = None, speculative=None):
    """A FastAPI app serving ``backend``. Its engine starts with the app and stops at shutdown.
    ``speculative``: request -> events of a speculative decoder (``serve --draft``)."""
    s = settings or ServeSettings()
    metrics = metrics or Metrics()
    engine = Engine(backend, max_batch=max_batch, max_queue=max_queue, metrics=metrics, speculative=speculative)
    metrics.add_gauge("queue_depth", "Admitted requests waiting for a batch slot.", lambda: engine.waiting)
    metrics.add_gauge("requests_in_flight", "Requests generating in the batch now.", lambda: engine.running)
    metrics.add_gauge("max_batch", "Sequences decoded together (batch slots).", lambda: engine.max_batch)
    prefix = getattr(backend.runtime, "prefix", None)  # the packed runtime's PrefixCache, when on
    if prefix is not None:
        metrics.add_gauge("prefix_cache_hits", "Prompts that reused cached K/V of a shared prefix.",
                          lambda: prefix.hits)
        metrics.add_gauge("prefix_cache_reused_tokens", "Prompt tokens not prefilled thanks to the prefix cache.",
                          lambda: prefix.reused_tokens)
    max_prompt = s.max_prompt_tokens or backend.context_length
    if max_prompt > backend.context_length:
        log.warning("--max-prompt-tokens %d exceeds the model's context of %d: longer prompts keep their "
                    "last %d tokens", max_prompt, backend.context_length, backend.context_length)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(title="tritlm", description="OpenAI-compatible API for tritlm models",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.settings = s
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ---- errors: always the OpenAI shape, never a traceback ----
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        msg = {404: "not found", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(f"{msg}: see /v1/models, /v1/completions, /v1/chat/completions",
                                       kind, None, str(e.status_code)),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return JSONResponse(error_body(str(e.errors()[:1]), "invalid_request_error", None, "invalid_value"),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"),
                            status_code=500)

    # ---- request handling ----
    def check_auth(request: Request) -> None:
        if s.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        # compare_digest: the time taken must not reveal how much of a guessed key is right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), s.api_key.encode()):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: str | None) -> None:
        if name is not None and name != s.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {s.model_name!r}",
                           param="model", code="model_not_found")

    async def parse(request: Request, cls: type[_Sampling]) -> Any:
        check_auth(request)
        data = await _read_json(request, s.max_body_bytes)
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            raise validation_to_api_error(e) from None
        req.check_supported()
        check_model(req.model)
        return req

    async def encode(text: str, param: str) -> list[int]:
        tok = backend.tokenizer
        try:
            # A long prompt off the event loop (it takes a while to tokenise); a short one inline: the
            # hop to a worker thread and back cost more than its tokenising, and at a batch's turn-over
            # every client's next request pays it while the event loop is busiest
            ids = tok.encode(text) if len(text) <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(tok.encode, text)
        except TritlmError as e:  # e.g. a character outside a char tokenizer's vocabulary
            raise ApiError(400, f"the prompt cannot be tokenised: {e}", param=param,
                           code="invalid_prompt") from None
        return list(ids)

    def check_ids(ids: list[int], param: str) -> list[int]:
        if not ids:
            if backend.tokenizer.bos_id is None:
                raise ApiError(400, "the prompt is empty (and the tokenizer has no BOS token to start from)",
                               param=param, code="invalid_prompt")
            ids = [backend.tokenizer.bos_id]
        bad = next((t for t in ids if not 0 <= t < backend.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {backend.vocab_size})",
                           param=param, code="invalid_prompt")
        if len(ids) > max_prompt:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than the limit of {max_prompt}",
                           param=param, code="context_length_exceeded")
        return ids

    def check_max_tokens(n: int | None, default: int, param: str) -> int:
        if n is None:
            return max(1, min(default, s.max_tokens_limit))
        if n > s.max_tokens_limit:
            raise ApiError(400, f"'{param}' is {n}, more than this server's limit of {s.max_tokens_limit}",
                           param=param, code="invalid_value")
        return n

    def build(req: _Sampling, ids: list[int], max_tokens: int, stop: list[str], lstrip: bool) -> GenRequest:
        bias = req.bias_map()
        bad = next((t for t in bias if not 0 <= t < backend.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"logit_bias token id {bad} is outside the vocabulary [0, {backend.vocab_size})",
                           param="logit_bias", code="invalid_value")
        try:
            sampling = SamplingParams(temperature=req.temperature, top_k=max(0, req.top_k), top_p=req.top_p,
                                      min_p=req.min_p, repetition_penalty=req.repetition_penalty, seed=req.seed,
                                      presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                      logit_bias=bias, stop=tuple(stop), typical_p=req.typical_p,
                                      mirostat=req.mirostat, mirostat_tau=req.mirostat_tau,
                                      mirostat_eta=req.mirostat_eta)
        except TritlmError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        if req.penalty_alpha:
            if not hasattr(backend.runtime, "contrastive"):
                raise ApiError(400, "contrastive search (penalty_alpha) needs a packed model", param="penalty_alpha",
                               code="unsupported_value")
            if req.top_k < 2:
                raise ApiError(400, "contrastive search (penalty_alpha) needs top_k >= 2 candidates", param="top_k",
                               code="invalid_value")
            if len(ids) + max_tokens + 1 > backend.context_length:
                raise ApiError(400, f"contrastive search: the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) "
                               f"must fit the context of {backend.context_length} (it does not restart the cache)",
                               param="max_tokens", code="context_length_exceeded")
        return GenRequest(ids, max_tokens, sampling, lstrip, penalty_alpha=req.penalty_alpha)

    def submit(gen: GenRequest) -> Job:
        try:
            return engine.submit(gen)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}", type="server_error", code="server_overloaded",
                           headers={"Retry-After": "1"}) from None

    async def collect(job: Job, request: Request) -> tuple[str, Finish]:
        parts: list[str] = []
        finish: Finish | None = None
        async for ev in job.events(poll=request.is_disconnected):
            if isinstance(ev, Delta):
                parts.append(ev.text)
            else:
                finish = ev
        if finish is None or finish.reason == "cancelled":
            raise ApiError(499, "the client closed the request", code="client_closed")
        if finish.reason == "error":
            raise ApiError(500, f"generation failed: {finish.error}", type="server_error",
                           code="generation_failed")
        return "".join(parts), finish

    def stream(job: Job, chunk: Callable[[str | None, str | None], dict], usage_chunk: Callable[[Finish], dict],
               include_usage: bool, first: dict | None = None) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            # The finally of job.events() cancels the job when this generator is closed or cancelled
            # (Starlette cancels it when the client disconnects), freeing the worker at the next token.
            if first is not None:
                yield _sse(first)
            async for ev in job.events():
                if isinstance(ev, Delta):
                    yield _sse(chunk(ev.text, None))
                elif ev.reason == "error":
                    yield _sse(error_body(f"generation failed: {ev.error}", "server_error", None,
                                          "generation_failed"))
                elif ev.reason != "cancelled":
                    yield _sse(chunk(None, ev.reason))
                    if include_usage:
                        yield _sse(usage_chunk(ev))
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- endpoints ----
    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompt = req.single_prompt()
        ids = await encode(prompt, "prompt") if isinstance(prompt, str) else list(prompt)
        ids = check_ids(ids, "prompt")
        max_tokens = check_max_tokens(req.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "max_tokens")
        job = submit(build(req, ids, max_tokens, req.stop_list(), lstrip=False))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": s.model_name}
        if req.stream:
            def chunk(text: str | None, reason: str | None) -> dict:
                return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": reason}]}

            def usage_chunk(f: Finish) -> dict:
                return {**base, "choices": [], "usage": _usage(f)}

            inc = bool(req.stream_options and req.stream_options.include_usage)
            return stream(job, chunk, usage_chunk, inc)
        text, f = await collect(job, request)
        return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": f.reason}],
                "usage": _usage(f)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = s.chat_template.render(msgs)
        except TemplateError as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        ids = check_ids(await encode(text, "messages"), "messages")
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        # No limit given: until EOS or the end of the context, as OpenAI does for chat.
        room = backend.context_length - len(ids) - (1 if req.penalty_alpha else 0)
        max_tokens = check_max_tokens(req.limit(), room, param)
        stop = list(s.chat_template.stop) + req.stop_list()
        job = submit(build(req, ids, max_tokens, stop, lstrip=s.chat_template.lstrip_reply))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.model_name}
        if req.stream:
            def chunk(text: str | None, reason: str | None) -> dict:
                delta = {"content": text} if text is not None else {}
                return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": reason}]}

            def usage_chunk(f: Finish) -> dict:
                return {**base, "choices": [], "usage": _usage(f)}

            first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}]}
            inc = bool(req.stream_options and req.stream_options.include_usage)
            return stream(job, chunk, usage_chunk, inc, first)
        out, f = await collect(job, request)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                             "logprobs": None, "finish_reason": f.reason}],
                "usage": _usage(f)}

    def model_card() -> dict:
        return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "tritlm",
                "max_model_len": backend.context_length}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.model_name, "queue_depth": engine.waiting,
                "in_flight": engine.running}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app


# ---- running it -------------------------------------------------------------------------------------
def build_app_for_model(model: str | Path, *, model_name: str | None = None, api_key: str | None = None,
                        max_prompt_tokens: int | None = None, max_tokens_limit: int = 4096,
                        chat_template: str | Path | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                        max_queue: int = 64, threads: int | None = None, prefix_cache_mb: int = 256,
                        device: str = "cpu", draft: str | Path | None = None, draft_k: int = 4,
                        kv_dtype: str = "auto", kv_len: int | None = None):
    """Load ``model`` (anything :func:`tritlm.load` reads) and build its app.

    ``max_batch``: sequences generated together, one KV cache slot each, decoded in one batched
    forward per step. ``threads``: torch intra-op threads (default: torch's own count).
    ``prefix_cache_mb``: K/V of earlier prompts kept for prompts that share their prefix (packed
    models; 0 = off). ``device``: see :func:`tritlm.api.resolve_device`. ``draft``: a smaller
    packed model with the same vocabulary: requests are decoded speculatively (``draft_k``
    proposals a round), one at a time instead of batched. ``kv_dtype``: a packed model's KV cache
    ("auto": fp16 on the CPU runtime, half the memory of "f32"; "q8": int8 rows with a scale each,
    half fp16's bytes, the CPU only; see :class:`~tritlm.infer.engine.Engine`). ``kv_len``: a packed
    model's cache positions per slot allocated at start (default 256; the cache doubles up to the
    context as sequences need it, each next size allocated on a background thread ahead of need:
    the context allocates it all, at the price of slower batched steps while sequences are short).
    """
    import torch

    import tritlm

    for flag, v, lo in (("--max-batch", max_batch, 1), ("--max-queue", max_queue, 0),
                        ("--max-tokens-limit", max_tokens_limit, 1), ("--prefix-cache-mb", prefix_cache_mb, 0),
                        ("--max-prompt-tokens", max_prompt_tokens if max_prompt_tokens is not None else 1, 1),
                        ("--kv-len", kv_len if kv_len is not None else 1, 1)):
        if v < lo:
            raise TritlmError(f"{flag} must be >= {lo}, got {v}")
    if threads is not None and threads < 1:
        raise TritlmError(f"--threads must be >= 1, got {threads}")
    n_threads = threads or torch.get_num_threads()
    if n_threads != torch.get_num_threads():
        torch.set_num_threads(n_threads)
    if draft_k < 1:
        raise TritlmError(f"--draft-k must be >= 1, got {draft_k}")
    if kv_dtype not in ("auto", "f16", "q8", "f32"):
        raise TritlmError(f"--kv-dtype must be auto, f16, q8 or f32, got {kv_dtype!r}")
    m = tritlm.load(model, device, kv_dtype)
    speculative = None
    if draft is not None:
        d = tritlm.load(draft, device, kv_dtype)
        if m.engine is None or d.engine is None:
            raise TritlmError("--draft needs packed models (tritlm pack) for both the model and the draft")
        if d.config.vocab_size != m.config.vocab_size:
            raise TritlmError(f"--draft {draft}: vocabulary of {d.config.vocab_size} tokens, the model has "
                              f"{m.config.vocab_size}")
        from tritlm.infer.speculative import speculative_events

        eos = m.tokenizer.eos_id
        stop = () if eos is None else (eos,)

        def speculative(req):
            return speculative_events(m.engine, d.engine, req, m.tokenizer, stop, draft_k)
        max_batch = 1
    backend = backend_for(m, max_batch, prefix_cache_mb)
    if kv_len is not None:
        for e in (m.engine, d.engine if draft is not None else None):
            if e is not None:
                e.ensure_len(min(kv_len, e.max_len))
    name = model_name or Path(model).resolve().name
    tmpl = load_chat_template(m.tokenizer, getattr(m, "path", None), chat_template)
    settings = ServeSettings(model_name=name, api_key=api_key or None, max_prompt_tokens=max_prompt_tokens,
                             max_tokens_limit=max_tokens_limit, chat_template=tmpl)
    log.info("model %s: context %d, vocab %d, chat template %s, batches of up to %d, %d torch thread(s)", name,
             backend.context_length, backend.vocab_size, tmpl.name, max_batch, n_threads)
    return create_app(backend, settings, max_batch=max_batch, max_queue=max_queue, speculative=speculative)


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          access_log: bool = True, **kwargs: Any) -> None:
    """Serve ``model`` until interrupted (the ``tritlm serve`` command). ``kwargs``: see build_app_for_model."""
    try:
        import uvicorn
    except ImportError:
        raise TritlmError("serving needs the serve extra: pip install 'tritlm[serve]'") from None
    app = build_app_for_model(model, **kwargs)
    # the first full collection had come during the first burst of requests and held the GIL ~180
    # ms (125M, 8 clients: first-wave TTFT 180-230 -> 53-57 ms with the heap frozen)
    freeze_startup_heap()
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the server is reachable from the network%s", host,
                    "" if kwargs.get("api_key") else " and has no API key (--api-key)")
    sock = bind_socket(host, port)
    log.info("serving %s at %s/v1", app.state.settings.model_name, socket_url(sock))
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
