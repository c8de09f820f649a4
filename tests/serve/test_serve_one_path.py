"""One generation path: the same request (prompt, seed, sampler settings with penalties, logit
bias and stop strings) gives the same tokens through the Python API, ``tritlm generate``,
``tritlm chat`` and the server, for a checkpoint and for its packed model."""

from __future__ import annotations

import io

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx
import torch

import tritlm
from tritlm.cli import main
from tritlm.data.tokenizer import CharTokenizer
from tritlm.formats.checkpoint import save_checkpoint
from tritlm.formats.packed import pack_checkpoint
from tritlm.infer.chat_template import DefaultChatTemplate
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.serve.app import ServerThread, ServeSettings, create_app
from tritlm.serve.engine import backend_for

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :.,!?\n"
PROMPT = "ROMEO: "
N = 40
N_CHAT = 20  # tritlm chat keeps max_seq_len - max_tokens of history: the whole prompt here


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("onepath")
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)
    m = Transformer(cfg).eval()
    ckpt = save_checkpoint(root / "run", 1, m, None, {}, {"model": cfg.to_dict()}, tok)
    packed, _ = pack_checkpoint(ckpt, root / "packed", fp_dtype="fp32")
    return {"checkpoint": ckpt, "packed": packed}


def _settings(tok) -> dict:
    e = tok.encode("e")[0]
    # N = 40 tokens from a 64-token context: the cache restarts on its recent half once, too
    return {"temperature": 0.9, "top_k": 30, "top_p": 0.95, "min_p": 0.01, "seed": 7, "repetition_penalty": 1.1,
            "frequency_penalty": 0.6, "presence_penalty": 0.4, "logit_bias": {e: 3.0}}


def _cli_flags(s: dict, stop: str) -> list[str]:
    (tid, b), = s["logit_bias"].items()
    return ["--temperature", str(s["temperature"]), "--top-k", str(s["top_k"]), "--top-p", str(s["top_p"]),
            "--min-p", str(s["min_p"]), "--seed", str(s["seed"]), "--repetition-penalty",
            str(s["repetition_penalty"]), "--frequency-penalty", str(s["frequency_penalty"]),
            "--presence-penalty", str(s["presence_penalty"]), "--logit-bias", f"{tid}={b}", "--stop", stop]


def _server_body(s: dict, stop: str, n: int = N) -> dict:
    return {**{k: v for k, v in s.items() if k != "logit_bias"}, "max_tokens": n, "stop": [stop],
            "logit_bias": {str(k): v for k, v in s["logit_bias"].items()}}


@pytest.mark.parametrize("kind", ["checkpoint", "packed"])
def test_same_request_same_tokens_everywhere(paths, kind, capsys, monkeypatch):
    m = tritlm.load(paths[kind])
    s = _settings(m.tokenizer)
    full = m.generate(PROMPT, N, **s)
    assert len(full) == N  # a character tokenizer: one token per character, no EOS
    # the penalties act: without them the same seed gives another text
    plain = m.generate(PROMPT, N, **{**s, "frequency_penalty": 0.0, "presence_penalty": 0.0})
    assert plain != full
    stop = full[25:27]  # a stop string the generation reaches (past the cache restart)
    want = full[:full.find(stop)]
    api = m.generate(PROMPT, N, **s, stop=[stop])
    assert api == want

    assert main(["generate", str(paths[kind]), "--prompt", PROMPT, "--max-tokens", str(N),
                 *_cli_flags(s, stop)]) == 0
    assert capsys.readouterr().out == PROMPT + want + "\n"

    with ServerThread(create_app(backend_for(m, 2), ServeSettings(model_name="m"))) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, **_server_body(s, stop)}, timeout=60)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        assert (c["text"], c["finish_reason"]) == (want, "stop")
        # completion_tokens counts the stop string's tokens too: the generation ran that far
        assert r.json()["usage"]["completion_tokens"] == len(want) + len(stop)
        msgs = [{"role": "user", "content": "Who goes there?"}]
        chat_srv = httpx.post(srv.url + "/v1/chat/completions",
                              json={"messages": msgs, **_server_body(s, "zzz", N_CHAT)}, timeout=60).json()
    # tritlm chat: the same messages, template and settings as the server's chat request
    monkeypatch.setattr("sys.stdin", io.StringIO("Who goes there?\n/exit\n"))
    assert main(["chat", str(paths[kind]), "--max-tokens", str(N_CHAT), *_cli_flags(s, "zzz")]) == 0
    reply = chat_srv["choices"][0]["message"]["content"]
    assert capsys.readouterr().out == reply + "\n"
    # and the Python API on the rendered prompt: the same text before the lstrip and turn stops
    raw = m.generate(DefaultChatTemplate().render(msgs), N_CHAT, **s, stop=["zzz", "\nUser:", "\nSystem:"])
    assert raw.lstrip() == reply


def test_checkpoint_and_packed_agree(paths):
    """The packed runtime reproduces the checkpoint's forward (fp32 parts): the same sampled text."""
    ck, pk = tritlm.load(paths["checkpoint"]), tritlm.load(paths["packed"])
    s = _settings(ck.tokenizer)
    assert ck.generate(PROMPT, N, **s) == pk.generate(PROMPT, N, **s)


@pytest.mark.parametrize("kind", ["checkpoint", "packed"])
def test_several_prompts_at_once_match_one_by_one(paths, kind):
    """generate(list) runs the batch path (one decode forward for all); each prompt keeps its own
    sampler state, so a seeded request gives the text it gives alone."""
    m = tritlm.load(paths[kind])
    s = {**_settings(m.tokenizer), "temperature": 0.0}
    prompts = ["ROMEO: ", "JULIET: I", "KING:"]
    alone = [m.generate(p, 20, **s) for p in prompts]
    assert m.generate(prompts, 20, **s) == alone
    if kind == "packed":
        assert m.engine.slots >= 3


def test_packed_server_prefix_cache_reuses_and_changes_nothing(paths):
    from tritlm.serve.metrics import parse_metrics

    system = "You are a terse assistant. Answer in one line.\n"
    prompts = [system + "ROMEO: ", system + "JULIET: "]
    ref = tritlm.load(paths["packed"])
    want = [ref.generate(p, 10, temperature=0) for p in prompts]
    m = tritlm.load(paths["packed"])  # a fresh engine: the server's alone
    with ServerThread(create_app(backend_for(m, 2, prefix_cache_mb=8), ServeSettings(model_name="m"))) as srv:
        got = [httpx.post(srv.url + "/v1/completions", json={"prompt": p, "max_tokens": 10, "temperature": 0},
                          timeout=60).json()["choices"][0]["text"] for p in prompts]
        v = parse_metrics(httpx.get(srv.url + "/metrics", timeout=60).text)
    assert got == want
    assert v["tritlm_prefix_cache_hits"] == 1 and v["tritlm_prefix_cache_reused_tokens"] == len(system)


def test_stateful_samplers_reach_the_server(paths):
    """Mirostat keeps its mu across the tokens of a request, typical_p filters: the server and the
    API run the same sampler state, so a seeded request gives the same text."""
    m = tritlm.load(paths["checkpoint"])
    with ServerThread(create_app(backend_for(m, 2), ServeSettings(model_name="m"))) as srv:
        for extra in ({"mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2}, {"typical_p": 0.5}):
            body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "seed": 11, **extra}
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == m.generate(PROMPT, 24, 1.0, seed=11, **extra)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "mirostat": 1}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "mirostat"
    # both act (a random model's surprise stays under mirostat's default mu = 2 tau = 10 bits, hence tau 3)
    assert m.generate(PROMPT, 24, 1.0, seed=11, mirostat=2, mirostat_tau=3.0) != m.generate(PROMPT, 24, 1.0, seed=11)
    assert m.generate(PROMPT, 24, 1.0, seed=11, typical_p=0.5) != m.generate(PROMPT, 24, 1.0, seed=11)


def test_contrastive_search_through_the_server_alongside_sampling(paths):
    """A contrastive request steps in its own slot while a sampled one decodes in the batch: each
    gives what it gives alone through the API."""
    import threading

    m = tritlm.load(paths["packed"])
    ref = tritlm.load(paths["packed"])
    want_c = ref.generate(PROMPT, 20, penalty_alpha=0.6, top_k=3)
    want_s = ref.generate("KING: ", 20, temperature=0.8, seed=5)
    with ServerThread(create_app(backend_for(m, 2), ServeSettings(model_name="m"))) as srv:
        out = {}

        def post(key, body):
            out[key] = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()

        ts = [threading.Thread(target=post, args=("c", {"prompt": PROMPT, "max_tokens": 20, "penalty_alpha": 0.6,
                                                         "top_k": 3})),
              threading.Thread(target=post, args=("s", {"prompt": "KING: ", "max_tokens": 20, "temperature": 0.8,
                                                         "seed": 5}))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        bad = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "penalty_alpha": 0.6, "top_k": 1},
                         timeout=60)
    assert out["c"]["choices"][0]["text"] == want_c and out["s"]["choices"][0]["text"] == want_s
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
    ck = tritlm.load(paths["checkpoint"])
    with ServerThread(create_app(backend_for(ck, 2), ServeSettings(model_name="m"))) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "penalty_alpha": 0.6, "top_k": 3},
                       timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "penalty_alpha"


def test_server_with_a_draft_decodes_speculatively(paths, tmp_path):
    """`serve --draft`: requests go through the speculative decoder (one at a time). The draft is
    another model of the same vocabulary, so proposals get rejected. Greedy, the server gives the
    model's own greedy text; sampled and seeded, the API's speculative text, which differs from
    plain sampling (so a server that ignored the draft would fail). A checkpoint draft is a
    one-line error."""
    from tritlm.errors import TritlmError
    from tritlm.serve.app import build_app_for_model

    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)
    ck = save_checkpoint(tmp_path / "draft-run", 1, Transformer(cfg).eval(), None, {}, {"model": cfg.to_dict()}, tok)
    draft, _ = pack_checkpoint(ck, tmp_path / "draft", fp_dtype="fp32")
    app = build_app_for_model(paths["packed"], model_name="m", draft=draft, draft_k=3)
    m = tritlm.load(paths["packed"])
    with ServerThread(app) as srv:
        greedy = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0},
                            timeout=60).json()["choices"][0]["text"]
        sampled = httpx.post(srv.url + "/v1/completions",
                             json={"prompt": PROMPT, "max_tokens": 16, "temperature": 0.9, "seed": 3},
                             timeout=60).json()["choices"][0]["text"]
    assert greedy == m.generate(PROMPT, 16, 0.0)
    assert sampled == m.generate(PROMPT, 16, 0.9, seed=3, draft=tritlm.load(draft), draft_k=3)
    assert sampled != m.generate(PROMPT, 16, 0.9, seed=3)
    with pytest.raises(TritlmError, match="packed models"):
        build_app_for_model(paths["packed"], draft=paths["checkpoint"])


def test_generate_kv_dtype_q8_is_the_apis(paths, capsys, monkeypatch):
    """`tritlm generate --kv-dtype q8` loads the model with the q8 cache (int8 rows in its engine)
    and gives `tritlm.load(..., kv_dtype="q8").generate`'s text for the same request."""
    import tritlm
    from tritlm.cli import main

    m = tritlm.load(paths["packed"], kv_dtype="q8")
    want = m.generate(PROMPT, 24, temperature=0.8, top_k=20, seed=3)
    loaded = []
    real = tritlm.load

    def spy(*a, **k):
        loaded.append(real(*a, **k))
        return loaded[-1]

    monkeypatch.setattr(tritlm, "load", spy)
    assert main(["generate", str(paths["packed"]), "--prompt", PROMPT, "--max-tokens", "24", "--temperature",
                 "0.8", "--top-k", "20", "--seed", "3", "--kv-dtype", "q8"]) == 0
    assert capsys.readouterr().out == PROMPT + want + "\n"
    assert [x.engine.k_cache[0].dtype for x in loaded] == [torch.int8]


def test_server_kv_dtype_reaches_the_engine(paths):
    """`serve --kv-dtype`: the packed engine's cache is fp16 by default, f32 or q8 (int8) when
    asked, the fused C step runs on each and serves a request; a bad value is a one-line error."""
    from tritlm.errors import TritlmError
    from tritlm.serve.app import build_app_for_model

    for kv, want in (("auto", torch.float16), ("f32", torch.float32), ("q8", torch.int8)):
        app = build_app_for_model(paths["packed"], model_name="m", kv_dtype=kv, max_batch=2)
        eng = app.state.engine.backend.runtime.engine
        assert eng.k_cache[0].dtype == want and eng.fused is not None
        with ServerThread(app) as srv:
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                           timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    with pytest.raises(TritlmError, match="kv-dtype"):
        build_app_for_model(paths["packed"], kv_dtype="bf16")


def test_server_kv_len_allocates_the_cache_up_front(tmp_path):
    """`serve --kv-len N`: the packed engine's slots hold at least N positions from the start (the
    cache's doubling from 256, capped at the context), the fused step runs on them; without it
    256. A value below 1 is a one-line error."""
    from tritlm.errors import TritlmError
    from tritlm.serve.app import build_app_for_model

    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=600)
    ckpt = save_checkpoint(tmp_path / "run", 1, Transformer(cfg).eval(), None, {}, {"model": cfg.to_dict()}, tok)
    packed, _ = pack_checkpoint(ckpt, tmp_path / "packed", fp_dtype="fp32")
    for kv_len, want in ((None, 256), (200, 256), (300, 512), (10 ** 6, 600)):
        app = build_app_for_model(packed, model_name="m", max_batch=2, kv_len=kv_len)
        eng = app.state.engine.backend.runtime.engine
        assert eng.cache_len == want and eng.k_cache[0].shape[:3] == (2, eng.KV, want) and eng.fused is not None
    with ServerThread(app) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                       timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    with pytest.raises(TritlmError, match="kv-len"):
        build_app_for_model(packed, kv_len=0)
