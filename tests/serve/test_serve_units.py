"""Server building blocks without a server: templates, request validation, metrics, and the
scheduler's admission / batching / cancellation over a scripted runtime."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Sequence

import pytest
import torch

pytest.importorskip("pydantic")  # the request models; comes with the serve extra (fastapi)

from tritlm.data.tokenizer import ByteTokenizer, CharTokenizer
from tritlm.infer.chat_template import (
    DefaultChatTemplate,
    JinjaChatTemplate,
    TemplateError,
    load_chat_template,
)
from tritlm.infer.generator import Request
from tritlm.infer.sampling import SamplingParams
from tritlm.serve.engine import Backend, Delta, Engine, Finish, QueueFull
from tritlm.serve.metrics import Metrics, parse_metrics
from tritlm.serve.schemas import ChatCompletionRequest, CompletionRequest, validation_to_api_error

# ---- chat templates ------------------------------------------------------------------------------
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def test_default_template_is_plain_text():
    t = DefaultChatTemplate()
    assert t.render(MSGS) == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert "\nUser:" in t.stop and t.lstrip_reply
    CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :.\n").encode(t.render(MSGS))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_jinja_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    cfg = {"chat_template": CHATML, "eos_token": {"content": "<|im_end|>"}}
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = load_chat_template(ByteTokenizer(), tmp_path)
    assert isinstance(t, JinjaChatTemplate)
    assert t.render(MSGS[1:2]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert t.stop == ("<|im_end|>",)


def test_template_search_order(tmp_path):
    assert isinstance(load_chat_template(ByteTokenizer(), tmp_path), DefaultChatTemplate)
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[-1]['content'] }}!")
    assert load_chat_template(ByteTokenizer(), tmp_path, override=f).render(MSGS) == "Bye!"
    tok = ByteTokenizer()
    tok.chat_template = "[{{ messages | length }}]"  # type: ignore[attr-defined]
    assert load_chat_template(tok, tmp_path).render(MSGS) == "[4]"


def test_template_errors_are_template_errors():
    t = JinjaChatTemplate(name="t", source="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        t.render(MSGS)
    t2 = JinjaChatTemplate(name="t", source="{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TemplateError):
        t2.render(MSGS)
    t3 = JinjaChatTemplate(name="t", source="{{ ''.__class__.__mro__ }}")  # the sandbox refuses
    with pytest.raises(TemplateError):
        t3.render(MSGS)


# ---- request validation --------------------------------------------------------------------------
def _err(cls, data):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as ei:
        cls.model_validate(data)
    return validation_to_api_error(ei.value)


def test_validation_errors_name_the_field():
    e = _err(ChatCompletionRequest, {"messages": [{"role": "wizard", "content": "x"}]})
    assert e.status == 400 and e.param == "messages.0.role"
    e = _err(CompletionRequest, {"prompt": "x", "max_tokens": "8"})  # strict: no string coercion
    assert e.param == "max_tokens"
    e = _err(CompletionRequest, {"prompt": "x", "temperature": 2.5})
    assert e.param == "temperature" and "2" in e.message
    e = _err(ChatCompletionRequest, {"messages": []})
    assert e.param == "messages"
    e = _err(CompletionRequest, {"prompt": "x", "stop": ["a"] * 17})
    assert e.param == "stop"
    ok = CompletionRequest.model_validate({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 1,
                                           "unknown_field": True})
    assert ok.single_prompt() == [1, 2, 3] and ok.temperature == 1.0


# ---- metrics -------------------------------------------------------------------------------------
def test_metrics_render_prometheus_text():
    m = Metrics()
    m.observe_request("/v1/completions", 200, 0.03)
    m.observe_request("/v1/completions", 200, 0.7)
    m.observe_request("/v1/completions", 400, 0.001)
    m.observe_generation(5, 8, "length", 0.01)
    m.add_gauge("queue_depth", "waiting", lambda: 3)
    text = m.render()
    v = parse_metrics(text)
    assert v['tritlm_requests_total{endpoint="/v1/completions",status="200"}'] == 2
    assert v['tritlm_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    assert v['tritlm_request_duration_seconds_bucket{endpoint="/v1/completions",le="0.05"}'] == 2
    assert v['tritlm_request_duration_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'] == 3
    assert v['tritlm_request_duration_seconds_count{endpoint="/v1/completions"}'] == 3
    assert v["tritlm_prompt_tokens_total"] == 5 and v["tritlm_completion_tokens_total"] == 8
    assert v["tritlm_queue_depth"] == 3
    assert "# TYPE tritlm_request_duration_seconds histogram" in text


# ---- the scheduler over a scripted runtime ------------------------------------------------------
class ScriptedRuntime:
    """Logits that force the bytes of ``text`` then EOS (byte tokenizer), ``delay`` seconds per
    decode forward; records every forward's batch and every released slot."""

    def __init__(self, text: str = "hello world", delay: float = 0.0, fail: bool = False, slots: int = 4):
        self.tok = ByteTokenizer()
        self.context_length, self.vocab_size, self.slots = 64, 257, slots
        self.script = self.tok.encode(text) + [self.tok.eos_id]
        self.delay, self.fail = delay, fail
        self.pos: dict[int, int] = {}
        self.batches: list[list[int]] = []
        self.released: list[int] = []
        self.started = threading.Event()

    def _logits(self, slot: int) -> torch.Tensor:
        out = torch.full((self.vocab_size,), -1e9)
        out[self.script[min(self.pos[slot], len(self.script) - 1)]] = 0.0
        return out

    def prefill(self, ids: Sequence[int], slot: int) -> torch.Tensor:
        self.started.set()
        self.pos[slot] = 0
        return self._logits(slot)

    def decode(self, tokens: Sequence[int], slots: Sequence[int]) -> torch.Tensor:
        self.batches.append(list(slots))
        if self.fail and len(self.batches) == 2:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        for s in slots:
            self.pos[s] += 1
        return torch.stack([self._logits(s) for s in slots])

    def reserve(self, n: int) -> int:
        return min(n, self.slots)

    def filled(self, slot: int) -> int:
        return 8 + self.pos[slot]

    def release(self, slot: int) -> None:
        self.released.append(slot)

    def step_scope(self):
        return contextlib.nullcontext()


def _engine(rt: ScriptedRuntime, **kw) -> Engine:
    return Engine(Backend(rt, rt.tok), **kw)


async def _collect(job) -> tuple[str, Finish]:
    text = []
    async for ev in job.events():
        if isinstance(ev, Delta):
            text.append(ev.text)
        else:
            return "".join(text), ev
    raise AssertionError("no Finish")


def _req(n: int = 32, stop: tuple[str, ...] = ()) -> Request:
    return Request([1, 2], n, SamplingParams(stop=stop))


def test_engine_finish_reasons_and_stop_strings():
    async def main():
        eng = _engine(ScriptedRuntime("hello world"), max_batch=1, max_queue=4)
        try:
            # EOS after the text: "stop", the EOS counted as a completion token (as OpenAI does)
            assert await _collect(eng.submit(_req(32))) == ("hello world", Finish("stop", 2, 12))
            text, f = await _collect(eng.submit(_req(5)))
            assert (text, f.reason, f.completion_tokens) == ("hello", "length", 5)
            text, f = await _collect(eng.submit(_req(32, stop=("o w",))))
            assert (text, f.reason) == ("hell", "stop")
        finally:
            eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_engine_batches_running_requests_in_one_forward():
    async def main():
        rt = ScriptedRuntime("abcdefgh", delay=0.01)
        eng = _engine(rt, max_batch=3, max_queue=4)
        try:
            jobs = [eng.submit(_req(6)) for _ in range(4)]
            outs = await asyncio.gather(*(_collect(j) for j in jobs))
            assert [o[0] for o in outs] == ["abcdef"] * 4
            assert max(len(b) for b in rt.batches) == 3  # three sequences per decode forward
            assert all(len(set(b)) == len(b) for b in rt.batches)  # each in its own slot
            # the fourth waited for a slot and was admitted as soon as one was freed
            assert sorted(rt.released) == [0, 0, 1, 2]
        finally:
            eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_engine_queue_full_and_cancel_frees_slots():
    async def main():
        rt = ScriptedRuntime("x" * 60, delay=0.05)
        m = Metrics()
        eng = _engine(rt, max_batch=1, max_queue=1, metrics=m)
        try:
            running = eng.submit(_req(60))
            waiting = eng.submit(_req(60))
            with pytest.raises(QueueFull):
                eng.submit(_req(60))
            await asyncio.to_thread(rt.started.wait, 10)
            assert (eng.running, eng.waiting) == (1, 1)
            waiting.cancel()  # a queued request leaves the queue at once
            assert eng.waiting == 0
            running.cancel()  # a running one frees its slot before the next step
            for _ in range(200):
                if eng.running == 0:
                    break
                await asyncio.sleep(0.01)
            assert eng.running == 0 and rt.released == [0]
            _text, f = await _collect(running)
            assert f.reason == "cancelled" and f.completion_tokens < 60
            assert m.rejected == 1
        finally:
            eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_engine_backend_error_is_an_error_event():
    async def main():
        eng = _engine(ScriptedRuntime("abcdef", fail=True))
        try:
            _text, f = await _collect(eng.submit(_req(32)))
            assert f.reason == "error" and "boom" in (f.error or "")
            assert eng.running == 0 and eng.waiting == 0
            text, f = await _collect(eng.submit(_req(3)))  # the scheduler goes on
            assert (text, f.reason) == ("abc", "length")
        finally:
            eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_server_connections_have_nagle_off():
    """The listening socket says IPPROTO_TCP (asyncio sets TCP_NODELAY only on such sockets) and
    has TCP_NODELAY itself: a token streamed after the headers must not wait for the client's
    delayed ACK (that cost ~40 ms of time to first token on kept-alive connections)."""
    import socket

    from tritlm.serve.listen import bind_socket

    lst = bind_socket("127.0.0.1", 0)
    try:
        assert lst.proto == socket.IPPROTO_TCP
        cli = socket.create_connection(lst.getsockname()[:2])
        conn, _ = lst.accept()
        with cli, conn:
            assert conn.proto == socket.IPPROTO_TCP  # what asyncio's transport checks
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            loop = asyncio.new_event_loop()
            try:  # the transport asyncio builds on an accepted socket keeps Nagle off
                async def check():
                    tr, _ = await loop.connect_accepted_socket(asyncio.Protocol, conn)
                    try:
                        return tr.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    finally:
                        tr.abort()
                assert loop.run_until_complete(check()) != 0
            finally:
                loop.close()
    finally:
        lst.close()
