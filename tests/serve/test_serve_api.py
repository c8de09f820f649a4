"""The OpenAI-compatible server end to end: a real tiny model, a real uvicorn server on a free
loopback port, the official ``openai`` client (and raw httpx for malformed requests)."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx
import torch

import tritlm
from tritlm.infer.chat_template import DefaultChatTemplate
from tritlm.serve.app import ServerThread, ServeSettings, create_app
from tritlm.serve.engine import backend_for
from tritlm.serve.metrics import parse_metrics

# One torch thread: on a shared 2-core machine this trains 5x faster than torch's default.
TINY = ["--preset", "tiny", "--max-steps", "30", "--threads", "1", "--quiet", "--set", "model.dim=32",
        "--set", "model.n_layers=1", "--set", "model.ffn_dim=64", "--set", "eval_batches=2",
        "--set", "tensorboard=false"]
NAME = "tiny"
TIMEOUT = 30.0  # every client call is bounded


def train_tiny(out: Path, fp: bool = True) -> Path:
    cmd = [sys.executable, "-m", "tritlm", "train", *(["--fp"] if fp else []), *TINY, "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def one_thread():
    # The tiny model's ops are far too small for intra-op threads; on a shared 2-core machine a
    # contended torch thread pool makes them several times slower (see docs/serve.md).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def loaded(model_dir, one_thread):
    return tritlm.load(model_dir)


def make_app(loaded, **kw):
    settings = ServeSettings(model_name=NAME, chat_template=DefaultChatTemplate(),
                             max_tokens_limit=kw.pop("max_tokens_limit", 4096),
                             max_body_bytes=kw.pop("max_body_bytes", 64 * 1024), api_key=kw.pop("api_key", None))
    return create_app(backend_for(loaded), settings, **kw)


@pytest.fixture(scope="module")
def server(loaded):
    with ServerThread(make_app(loaded, max_batch=2, max_queue=32)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    # max_retries=0: the tests want to see every error, not have the client retry it away.
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT) as c:
        yield c


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(url + "/metrics", timeout=TIMEOUT).text)


def wait_metric(url: str, name: str, value: float, within: float = 10.0) -> float:
    deadline = time.monotonic() + within
    while True:
        v = metrics(url)[name]
        if v == value or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


# ---- happy paths ---------------------------------------------------------------------------------
def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    h = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert h["status"] == "ok" and h["model"] == NAME


def test_completion_greedy_is_deterministic_and_counts_tokens(client, loaded):
    r1 = client.completions.create(model=NAME, prompt="ROMEO:\n", max_tokens=12, temperature=0)
    r2 = client.completions.create(model=NAME, prompt="ROMEO:\n", max_tokens=12, temperature=0)
    assert r1.choices[0].text == r2.choices[0].text
    assert r1.choices[0].finish_reason == "length"
    assert r1.usage.prompt_tokens == len(loaded.tokenizer.encode("ROMEO:\n"))
    assert r1.usage.completion_tokens == 12
    assert r1.usage.total_tokens == r1.usage.prompt_tokens + 12
    assert r1.id.startswith("cmpl-") and r1.model == NAME
    # Greedy through the server = greedy through the library.
    ref = loaded.generate("ROMEO:\n", max_tokens=12, temperature=0)
    assert r1.choices[0].text == ref


def test_seed_reproduces_sampling(client):
    kw = {"model": NAME, "prompt": "KING:", "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234}
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b
    # top_k / min_p travel as extension fields
    r = client.completions.create(**kw, extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens == 16


def test_stop_string_cuts_and_is_excluded(client):
    full = client.completions.create(model=NAME, prompt="KING:", max_tokens=24, temperature=0).choices[0].text
    stop = full[6:8]
    want = full[:full.find(stop)]
    r = client.completions.create(model=NAME, prompt="KING:", max_tokens=24, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    # the same through a stream
    s = client.completions.create(model=NAME, prompt="KING:", max_tokens=24, temperature=0, stop=stop, stream=True)
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logit_bias_and_penalties_reach_the_sampler(client, loaded):
    a = loaded.tokenizer.encode("a")[0]
    r = client.completions.create(model=NAME, prompt="KING:", max_tokens=6, temperature=0, logit_bias={str(a): 100})
    assert r.choices[0].text == "aaaaaa"
    # Two tokens forced up by +50 and a frequency penalty of 2: the choice between them follows
    # OpenAI's rule, logit + bias - 2 * (times generated so far), recomputed here from the model.
    b = loaded.tokenizer.encode("b")[0]
    r = client.completions.create(model=NAME, prompt="KING:", max_tokens=6, temperature=0,
                                  logit_bias={str(a): 50, str(b): 50}, frequency_penalty=2.0)
    text = r.choices[0].text
    prompt, hist = loaded.tokenizer.encode("KING:"), []
    for _ in range(6):
        lg = loaded.logits(prompt + hist)[-1].double()
        lg[a] += 50
        lg[b] += 50
        for t in set(hist):
            lg[t] -= 2.0 * hist.count(t)
        hist.append(int(lg.argmax()))
    assert text == loaded.tokenizer.decode(hist) and set(text) <= {"a", "b"}
    r = client.completions.create(model=NAME, prompt="KING:", max_tokens=4, presence_penalty=-2.0, seed=3)
    assert r.usage.completion_tokens == 4


def test_token_id_prompt(client, loaded):
    ids = loaded.tokenizer.encode("KING:")
    r1 = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    r2 = client.completions.create(model=NAME, prompt="KING:", max_tokens=8, temperature=0)
    assert r1.choices[0].text == r2.choices[0].text


def test_chat_completion(client, loaded):
    msgs = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who goes there?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and r.object == "chat.completion"
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt = DefaultChatTemplate().render(msgs)
    assert r.usage.prompt_tokens == len(loaded.tokenizer.encode(prompt))
    assert msg.content == loaded.generate(prompt, max_tokens=10, temperature=0).lstrip()[:len(msg.content)]
    # max_completion_tokens (the newer name) and content given as parts
    r = client.chat.completions.create(model=NAME, max_completion_tokens=3, temperature=0,
                                       messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert r.usage.completion_tokens <= 3


def test_chat_default_max_tokens_fills_the_context(client, loaded):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], seed=1)
    if r.choices[0].finish_reason == "length":
        assert r.usage.total_tokens == loaded.config.max_seq_len


def test_chat_stream_chunks(client):
    s = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Speak"}],
                                       max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    fin = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(fin) == 1 and fin[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Speak"}],
                                       max_tokens=8, temperature=0)
    assert text == r.choices[0].message.content


def test_raw_sse_ends_with_done(server):
    body = {"model": NAME, "prompt": "KING:", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and len(events) == 4 + 2  # 4 tokens, the finish chunk, [DONE]


# ---- errors --------------------------------------------------------------------------------------
BAD = [
    # (path, body (bytes = raw), status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"prompt": 123}, 400, "prompt"),
    ("/v1/completions", {"prompt": "KING", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "KING", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "KING", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "KING", "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "KING", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "KING", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "KING", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "KING", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "KING", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "KING", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "KING", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "KING", "stop": ["x"] * 17}, 400, "stop"),
    ("/v1/completions", {"prompt": "KING", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "KING", "logit_bias": {"zz": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "KING", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": ["KING", "QUEEN"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "<|im_start|>"}, 400, "prompt"),  # not in the char vocabulary
    ("/v1/completions", {"prompt": "KING " * 40}, 400, "prompt"),  # 200 tokens > context of 64
    # longer than app.INLINE_TOKENIZE_CHARS: tokenised on a worker thread, the same checks
    ("/v1/completions", {"prompt": "KING " * 500}, 400, "prompt"),
    ("/v1/completions", {"prompt": "KING " * 500 + "<|im_start|>"}, 400, "prompt"),
    ("/v1/completions", {"prompt": "KING", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "x" * 70_000}, 413, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
]


def test_malformed_requests_get_openai_style_4xx(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        for path, body, status, param in BAD:
            if isinstance(body, bytes):
                r = c.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(path, json=body)
            assert r.status_code == status, (path, body if not isinstance(body, dict) or len(str(body)) < 200
                                             else "...", r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["message"] and "Traceback" not in r.text
            if param is not None:
                assert err["param"] is not None and err["param"].startswith(param), (body, err)
        for method, path, status in [("GET", "/v1/completions", 405), ("GET", "/nope", 404),
                                     ("GET", "/v1/models/other", 404)]:
            r = c.request(method, path)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        v = parse_metrics(c.get("/metrics").text)
    assert not any(k.startswith("tritlm_requests_total") and 'status="5' in k for k in v)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=NAME, prompt="KING", max_tokens=-5)
    assert ei.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context|limit"):
        client.completions.create(model=NAME, prompt="KING " * 40)


# ---- concurrency, queue, disconnects -------------------------------------------------------------
def test_client_disconnect_frees_the_slot(server, client):
    before = metrics(server.url).get('tritlm_generations_total{reason="cancelled"}', 0.0)
    s = client.completions.create(model=NAME, prompt="KING:", max_tokens=4000, stream=True)
    first = next(iter(s))
    assert first.choices[0].text is not None
    assert metrics(server.url)["tritlm_requests_in_flight"] == 1
    s.close()  # drop the connection mid-stream
    assert wait_metric(server.url, "tritlm_requests_in_flight", 0) == 0
    after = wait_metric(server.url, 'tritlm_generations_total{reason="cancelled"}', before + 1)
    assert after == before + 1


def test_non_streaming_disconnect_frees_the_slot_at_the_next_token(server):
    """Issue 12, part 4: a client that gives up on a non-streaming request while tokens keep coming
    cancels its job (it used to run on to max_tokens: the disconnect poll only ran after a second
    without a token)."""
    key = 'tritlm_generations_total{reason="cancelled"}'
    before = metrics(server.url).get(key, 0.0)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "KING:", "max_tokens": 4000},
                   timeout=0.5)
    assert wait_metric(server.url, key, before + 1) == before + 1
    assert wait_metric(server.url, "tritlm_requests_in_flight", 0) == 0


def test_full_queue_is_503_and_a_queued_disconnect_leaves_the_queue(loaded):
    with ServerThread(make_app(loaded, max_batch=1, max_queue=1)) as srv, \
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT) as c:
        running = c.completions.create(model=NAME, prompt="KING:", max_tokens=4000, stream=True)
        next(iter(running))  # generating now
        queued = c.completions.create(model=NAME, prompt="KING:", max_tokens=4000, stream=True)
        assert wait_metric(srv.url, "tritlm_queue_depth", 1) == 1
        with pytest.raises(openai.APIStatusError) as ei:
            c.completions.create(model=NAME, prompt="KING:", max_tokens=4)
        assert ei.value.status_code == 503
        assert ei.value.body["code"] == "server_overloaded"
        assert ei.value.response.headers.get("retry-after") == "1"
        queued.close()
        assert wait_metric(srv.url, "tritlm_queue_depth", 0) == 0
        running.close()
        assert wait_metric(srv.url, "tritlm_requests_in_flight", 0) == 0
        r = c.completions.create(model=NAME, prompt="KING:", max_tokens=2)  # the server recovered
        assert r.usage.completion_tokens == 2
        assert metrics(srv.url)["tritlm_rejected_total"] == 1


def test_concurrent_load_no_errors(server):
    """16 clients x 2 requests, max_tokens 8 (the full 64-request run is benchmarks/bench_serve.py)."""
    clients, per_client = 16, 2
    m0 = metrics(server.url)

    def run(c: int) -> list[float]:
        lat = []
        with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT) as cl:
            for k in range(per_client):
                t0 = time.perf_counter()
                if (c + k) % 2:
                    r = cl.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hail"}],
                                                   max_tokens=8, seed=c)
                else:
                    r = cl.completions.create(model=NAME, prompt="KING:", max_tokens=8, seed=c)
                assert r.usage.completion_tokens <= 8
                lat.append(time.perf_counter() - t0)
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        lats = sorted(x for part in ex.map(run, range(clients)) for x in part)  # raises on any error
    wall = time.perf_counter() - t0
    assert len(lats) == clients * per_client
    p50, p95 = statistics.median(lats), lats[int(0.95 * (len(lats) - 1))]
    print(f"\nload: {len(lats)} requests, 0 errors, p50 {p50 * 1e3:.0f} ms, p95 {p95 * 1e3:.0f} ms, "
          f"{len(lats) / wall:.1f} req/s")
    m1 = metrics(server.url)
    done = sum(v - m0.get(k, 0) for k, v in m1.items()
               if k.startswith("tritlm_requests_total") and 'status="200"' in k and "/v1/" in k and "models" not in k)
    assert done == clients * per_client
    assert m1["tritlm_requests_in_flight"] == 0 and m1["tritlm_queue_depth"] == 0
    assert m1["tritlm_completion_tokens_total"] > m0["tritlm_completion_tokens_total"]


# ---- the command line, auth ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_with_api_key(model_dir):
    port = _free_port()
    env = {**os.environ, "TRITLM_API_KEY": "s3cret", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tritlm", "serve", str(model_dir), "--port", str(port),
                             "--model-name", NAME, "--max-tokens-limit", "32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        for key in ("wrong", None):
            r = httpx.get(url + "/v1/models", timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {key}"} if key else {})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=TIMEOUT) as c, \
                pytest.raises(openai.AuthenticationError):
            c.completions.create(model=NAME, prompt="KING", max_tokens=2)
        with openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=TIMEOUT) as c:
            assert c.completions.create(model=NAME, prompt="KING", max_tokens=2).usage.completion_tokens == 2
            with pytest.raises(openai.BadRequestError, match="limit of 32"):
                c.completions.create(model=NAME, prompt="KING", max_tokens=33)
        assert httpx.get(url + "/metrics", timeout=TIMEOUT).status_code == 200  # scrapers need no key
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "serving tiny at http://127.0.0.1:" in out
    assert "Traceback" not in out


@pytest.mark.slow
def test_ternary_and_packed_models_serve(tmp_path, one_thread):
    """The same API over a ternary checkpoint (PyTorch) and its packed folder (CPU runtime)."""
    tern = train_tiny(tmp_path / "tern", fp=False)
    packed = tmp_path / "packed"
    subprocess.run([sys.executable, "-m", "tritlm", "pack", str(tern), str(packed)], check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    outs = []
    for path in (tern, packed):
        m = tritlm.load(path)
        with ServerThread(make_app(m)) as srv, \
                openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT) as c:
            a = m.tokenizer.encode("a")[0]
            r = c.completions.create(model=NAME, prompt="KING:", max_tokens=4, temperature=0,
                                     logit_bias={str(a): 100})
            assert r.choices[0].text == "aaaa"
            outs.append(c.completions.create(model=NAME, prompt="KING:", max_tokens=12, temperature=0)
                        .choices[0].text)
            s = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          stream=True)
            assert sum(1 for _ in s) >= 2
    assert outs[0] == outs[1]  # the packed runtime agrees with PyTorch on greedy decoding


def test_hostile_values_are_4xx_or_generate_never_5xx(server):
    """Deep nesting, non-ASCII digit token ids and extreme-but-valid sampling values (issue 10)."""
    deep = b'{"model": "x", "prompt": "a", "extra": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
        for key in ("\u00b2", "\u0661", "1\u00b2", "", "--1", "9" * 40):
            r = c.post("/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 2,
                                                "logit_bias": {key: 1.0}})
            assert r.status_code == 400, (key, r.text[:200])
        # whatever passes validation generates: tiny temperature / penalty, huge penalties
        for extra in ({"temperature": 1e-300}, {"repetition_penalty": 1e-300, "temperature": 0.7},
                      {"temperature": 2.0, "top_p": 1e-9}, {"frequency_penalty": 2.0, "presence_penalty": -2.0},
                      {"temperature": 1e-300, "repetition_penalty": 1e-300}):
            r = c.post("/v1/completions", json={"model": NAME, "prompt": "ROMEO:", "max_tokens": 4, "seed": 1,
                                                **extra})
            assert r.status_code == 200, (extra, r.text[:300])
            assert r.json()["choices"][0]["text"] is not None
        v = parse_metrics(c.get("/metrics").text)
    assert not any(k.startswith("tritlm_requests_total") and 'status="5' in k for k in v)
