"""Server building blocks without a server: text deltas, stop strings, penalties, templates,
request validation, metrics, and the engine's admission / cancellation with a scripted backend."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import torch

pytest.importorskip("pydantic")  # the request models; comes with the serve extra (fastapi)

from tritlm.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer
from tritlm.infer.sampling import SamplingParams
from tritlm.serve.chat_template import (
    DefaultChatTemplate,
    JinjaChatTemplate,
    TemplateError,
    load_chat_template,
)
from tritlm.serve.engine import (
    Delta,
    Engine,
    Finish,
    GenerationRequest,
    IncrementalDetokenizer,
    LogitBias,
    PresenceFrequencyPenalty,
    QueueFull,
    StopMatcher,
)
from tritlm.serve.metrics import Metrics, parse_metrics
from tritlm.serve.schemas import ChatCompletionRequest, CompletionRequest, validation_to_api_error


# ---- incremental detokenisation ------------------------------------------------------------------
def _deltas(tok, ids: Sequence[int], prompt: Sequence[int] = ()) -> list[str]:
    d = IncrementalDetokenizer(tok, prompt)
    out = [d.add(t) for t in ids]
    out.append(d.flush())
    return out


def test_detokenizer_bytes_holds_back_partial_characters():
    tok = ByteTokenizer()
    text = "héllo, 日本語 🙂!"
    parts = _deltas(tok, tok.encode(text), tok.encode("prompt "))
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)  # never emits half a character


def test_detokenizer_flush_emits_incomplete_tail_as_replacement():
    tok = ByteTokenizer()
    ids = tok.encode("ab日")[:-1]  # cut inside the 3-byte character
    parts = _deltas(tok, ids)
    assert "".join(parts[:-1]) == "ab"
    assert parts[-1] == "\ufffd"


def test_detokenizer_byte_level_bpe_matches_full_decode():
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé wörds, 東京 and more words. " * 20
    tok = HFTokenizer.train_bpe(text, vocab_size=300)
    ids = tok.encode("Über die Brücke: the fox said 東京 twice, twice.")
    assert "".join(_deltas(tok, ids, tok.encode("Prompt:"))) == tok.decode(ids)


# ---- stop strings --------------------------------------------------------------------------------
def test_stop_matcher_across_chunks():
    m = StopMatcher(["\nUser:"])
    assert m.feed("Hello") == ("Hello", False)
    assert m.feed(" there\nUs") == (" there", False)  # "\nUs" may start the stop string: held back
    assert m.feed("er: next") == ("", True)


def test_stop_matcher_releases_false_alarm_and_picks_earliest():
    m = StopMatcher(["abc", "xy"])
    assert m.feed("za") == ("z", False)
    assert m.feed("b!") == ("ab!", False)  # "ab!" is not "abc": released
    m2 = StopMatcher(["world", "lo w"])
    assert m2.feed("hello world") == ("hel", True)  # the earliest match wins
    m3 = StopMatcher([])
    assert m3.feed("anything") == ("anything", False)


def test_stop_matcher_flush_returns_held_text():
    m = StopMatcher(["STOP"])
    assert m.feed("go ST") == ("go ", False)
    assert m.flush() == "ST"


# ---- logit processors ----------------------------------------------------------------------------
def test_presence_frequency_penalty_formula():
    p = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)
    logits = torch.zeros(5)
    out = p(logits, [1, 1, 3])
    expect = torch.tensor([0.0, -(2 * 0.25 + 0.5), 0.0, -(0.25 + 0.5), 0.0])
    assert torch.allclose(out, expect)
    out2 = p(logits, [1, 1, 3, 3])  # incremental update
    assert out2[3] == pytest.approx(-(2 * 0.25 + 0.5))
    assert torch.equal(p(torch.ones(5), []), torch.ones(5))  # a shorter history: counted afresh


def test_logit_bias_bans_and_forces():
    b = LogitBias({0: -100.0, 2: 100.0})
    out = b(torch.zeros(4), [])
    assert out.tolist() == [-100.0, 0.0, 100.0, 0.0]


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


# ---- the engine with a scripted backend ----------------------------------------------------------
class ScriptedBackend:
    """Yields the ids of ``text`` (byte tokenizer), ``delay`` seconds per token; records closes."""

    def __init__(self, text: str = "hello world", delay: float = 0.0, fail: bool = False):
        self.tokenizer = ByteTokenizer()
        self.context_length = 64
        self.vocab_size = 257
        self.text, self.delay, self.fail = text, delay, fail
        self.closed = 0
        self.started = threading.Event()

    def generate_stream(self, prompt_ids, max_tokens, params, stop_ids, processors=()) -> Iterator[int]:
        self.started.set()
        try:
            for i, t in enumerate(self.tokenizer.encode(self.text)[:max_tokens]):
                if self.fail and i == 2:
                    raise RuntimeError("boom")
                time.sleep(self.delay)
                yield t
        finally:
            self.closed += 1


async def _collect(job) -> tuple[str, Finish]:
    text = []
    async for ev in job.events():
        if isinstance(ev, Delta):
            text.append(ev.text)
        else:
            return "".join(text), ev
    raise AssertionError("no Finish")


def _req(n: int = 32, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest([1, 2], n, SamplingParams(), stop)


def test_engine_finish_reasons_and_stop_strings():
    async def main():
        eng = Engine(ScriptedBackend("hello world"), workers=1, max_queue=4)
        try:
            # The backend ended before max_tokens (its own stop condition): "stop".
            assert await _collect(eng.submit(_req(32))) == ("hello world", Finish("stop", 2, 11))
            text, f = await _collect(eng.submit(_req(5)))
            assert (text, f.reason, f.completion_tokens) == ("hello", "length", 5)
            text, f = await _collect(eng.submit(_req(32, stop=("o w",))))
            assert (text, f.reason) == ("hell", "stop")
        finally:
            eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_engine_queue_full_and_cancel_frees_slots():
    async def main():
        be = ScriptedBackend("x" * 64, delay=0.05)
        m = Metrics()
        eng = Engine(be, workers=1, max_queue=1, metrics=m)
        try:
            running = eng.submit(_req(64))
            waiting = eng.submit(_req(64))
            with pytest.raises(QueueFull):
                eng.submit(_req(64))
            await asyncio.to_thread(be.started.wait, 10)
            assert (eng.running, eng.waiting) == (1, 1)
            waiting.cancel()  # a queued request leaves the queue at once
            assert eng.waiting == 0
            running.cancel()  # a running one stops at its next token
            for _ in range(200):
                if eng.running == 0:
                    break
                await asyncio.sleep(0.01)
            assert eng.running == 0 and be.closed == 1  # the generator was closed: cache freed
            _text, f = await _collect(running)
            assert f.reason == "cancelled"
            assert m.rejected == 1
        finally:
            eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_engine_backend_error_is_an_error_event():
    async def main():
        eng = Engine(ScriptedBackend("abcdef", fail=True))
        try:
            _text, f = await _collect(eng.submit(_req(32)))
            assert f.reason == "error" and "boom" in (f.error or "")
            assert eng.running == 0 and eng.waiting == 0
        finally:
            eng.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))
