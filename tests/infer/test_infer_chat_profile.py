"""chat (template, history, stop strings), profile (timer table, Chrome trace, layer tracer), registry CLI."""

from __future__ import annotations

import io
import json

import pytest
import torch

from tritlm.formats.packed import from_transformer, random_packed, save_packed
from tritlm.infer.chat import ChatSession, chat_repl
from tritlm.infer.chat_template import DefaultChatTemplate
from tritlm.infer.engine import Engine
from tritlm.infer.profile import LayerTimer, LayerTracer, profile_model
from tritlm.infer.sampling import SamplingParams
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer


def _packed(tmp_path=None):
    torch.manual_seed(0)
    from tritlm.data.tokenizer_load import build_tokenizer

    tok = build_tokenizer("byte")
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=128, n_layers=1, n_heads=4, ffn_dim=128, max_seq_len=256)
    return from_transformer(Transformer(cfg).eval(), tok, fp_dtype="fp32")


def Loaded(pm):  # what tritlm.load returns for a packed folder
    from tritlm.api import LoadedModel

    eng = Engine(pm)
    return LoadedModel(eng.model, pm.tokenizer, None, "packed", engine=eng)


def test_render_template():
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert DefaultChatTemplate().render(msgs) == "System: Be terse.\nUser: Hi\nAssistant:"


def test_chat_history_and_incremental_prefill():
    m = Loaded(_packed())
    chat = ChatSession(m, SamplingParams(temperature=0), max_tokens=8, system="Be terse.")
    streamed: list[str] = []
    r1 = chat.reply("Hello", streamed.append)
    assert "".join(streamed) == r1
    pre = m.engine.stats.prefill_tokens
    chat.reply("Again")
    # the second turn's prompt extends the first: far fewer tokens prefilled than the whole prompt
    n2 = len(DefaultChatTemplate().render(chat.messages[:-1]).encode())
    assert m.engine.stats.prefill_tokens - pre < n2
    assert [x["role"] for x in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    chat.reset()
    assert [x["role"] for x in chat.messages] == ["system"]


def test_chat_repl_reads_stdin(tmp_path):
    import tritlm

    p = save_packed(_packed(), tmp_path / "m")
    chat = ChatSession(tritlm.load(p), SamplingParams(temperature=0.0, seed=0), max_tokens=5)
    out = io.StringIO()
    chat_repl(chat, io.StringIO("hi\n/reset\nyo\n/exit\n"), out, banner="not shown: stdin is no terminal")
    assert out.getvalue().count("\n") >= 2  # one line per reply (replies may hold newlines)
    assert "not shown" not in out.getvalue()
    assert [x["role"] for x in chat.messages] == ["user", "assistant"]  # /reset dropped the first turn


def test_chat_command_reads_stdin(tmp_path, monkeypatch, capsys):
    from tritlm.cli import main

    p = save_packed(_packed(), tmp_path / "m")
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", str(p), "--max-tokens", "5", "--temperature", "0", "--seed", "0"]) == 0
    first = capsys.readouterr().out
    assert first.count("\n") >= 1
    # the q8 KV cache reaches the engine (greedy over this random model: the same reply or close)
    import tritlm

    loads = []
    real = tritlm.load
    monkeypatch.setattr(tritlm, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert main(["chat", str(p), "--max-tokens", "5", "--temperature", "0", "--kv-dtype", "q8"]) == 0
    assert loads and loads[0][2] == "q8" and capsys.readouterr().out.count("\n") >= 1


def test_profile_timer_trace_and_tracer(tmp_path):
    pm = random_packed(ModelConfig(vocab_size=300, dim=128, n_layers=2, n_heads=4, ffn_dim=256, max_seq_len=64))
    eng = Engine(pm)
    timer = LayerTimer()
    eng.timer = timer
    eng.logits([1, 2, 3])
    names = {r[0] for r in timer.table()}
    assert {"layer0.attn", "layer1.mlp", "head"} <= names
    timer.chrome_trace(str(tmp_path / "t.json"))
    ev = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert ev and all(e["ph"] == "X" and e["dur"] >= 0 for e in ev)
    # tracer: packed vs itself -> no divergence; vs a model with one corrupted layer -> found there
    a, b = LayerTracer(), LayerTracer()
    eng.timer, eng.tracer = None, a
    eng.logits([1, 2, 3])
    bad = Engine(pm)
    with torch.no_grad():
        bad.model.layers[1].post_attention_layernorm.weight.mul_(3)
    bad.tracer = b
    bad.logits([1, 2, 3])
    rows = a.compare(b)
    first = [r for r in rows if r["first_divergent"]]
    assert len(first) == 1 and first[0]["layer"] == 1 and first[0]["name"] == "mlp_out"


def test_profile_command_runs(tmp_path, capsys):
    pm = random_packed(ModelConfig(vocab_size=300, dim=128, n_layers=2, n_heads=4, ffn_dim=256, max_seq_len=64))
    p = save_packed(pm, tmp_path / "m")
    r = profile_model(p, prompt_tokens=8, decode_tokens=4, trace=tmp_path / "trace.json", compare=True)
    assert r.prefill_s > 0 and r.decode_s > 0 and 0 < r.kernel_share <= 1
    assert "layer0.attn" in {row[0] for row in r.sections}
    assert r.divergence and all(d["rel_diff"] >= 0 for d in r.divergence)
    assert r.trace == tmp_path / "trace.json" and r.trace.exists()
    # the command prints the same report
    from tritlm.cli import main

    assert main(["profile", str(p), "--prompt-tokens", "8", "--decode-tokens", "4",
                 "--trace", str(tmp_path / "t2.json"), "--compare"]) == 0
    out = capsys.readouterr().out
    assert "layer0.attn" in out and "rel diff" in out and "fused decode step by section" in out
    assert (tmp_path / "t2.json").exists()


def test_fused_profile_sections_add_up():
    """The fused step's section timers: every section measured, the C sections inside the C time,
    the weight bytes per token those of the packed model, the total the wall time per token."""
    from tritlm.infer.engine import Engine
    from tritlm.infer.profile import fused_profile

    pm = random_packed(ModelConfig(vocab_size=300, dim=128, n_layers=2, n_heads=4, ffn_dim=256, max_seq_len=64))
    eng = Engine(pm, threads=2)
    if eng.fused is None:
        pytest.skip("no compiled kernels")
    rows = {r["section"]: r for r in fused_profile(eng, 12, read_bw=10e9)}
    assert set(rows) == {"qkv", "o", "gate_up", "down", "attention", "norms+rope+act", "head", "python", "total"}
    assert all(r["ms_per_token"] > 0 for r in rows.values())
    parts = sum(r["ms_per_token"] for k, r in rows.items() if k != "total")
    assert parts == pytest.approx(rows["total"]["ms_per_token"], rel=0.05)
    ternary = sum(pl.nbytes for pl in pm.linears.values()) / 1e6
    assert sum(rows[k]["mb_per_token"] for k in ("qkv", "o", "gate_up", "down")) == pytest.approx(ternary)
    assert rows["head"]["mb_per_token"] == pytest.approx(300 * 128 * 2 / 1e6)  # fp16 head
    assert rows["qkv"]["gb_s"] == pytest.approx(rows["qkv"]["mb_per_token"] / rows["qkv"]["ms_per_token"], rel=1e-6)
    eng.fused.set_profile(False)  # off: the counters stay at zero
    eng.forward_seq([1])
    assert eng.fused.read_profile() == ({k: 0.0 for k in eng.fused.SECTIONS}, 0)


def test_models_registry_cli(tmp_path, monkeypatch, capsys):
    from tritlm.cli import main

    monkeypatch.setenv("TRITLM_MODELS", str(tmp_path / "reg.json"))
    target = tmp_path / "somewhere"
    target.mkdir()
    assert main(["models", "add", "mine", str(target)]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == {"mine": str(target.resolve())}
    from tritlm.registry import resolve_path

    assert resolve_path("mine") == target.resolve()
    assert main(["models", "remove", "mine"]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == {}


def test_bench_json_rows_and_ratios(tmp_path, monkeypatch):
    """`tritlm bench --json --tune` on the tiny preset: every row measured, ratios computed from them."""
    from tritlm.infer.bench_llama_cpp import available, llama_bench_binary
    from tritlm.infer.profile import bench_models, engine_shapes
    from tritlm.model.config import preset

    monkeypatch.setenv("TRITLM_CACHE_DIR", str(tmp_path))  # the tuning cache (and GGUF) go here
    res = bench_models(["tiny"], [1], decode_tokens=4, prompt_tokens=8, dense=True, head="t4", tune=True, reps=2)
    tuned = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    for n, k in engine_shapes(preset("tiny", vocab_size=32000), "t4"):
        assert any(f"|n={n}|k={k}|m=1|t=1|" in key for key in tuned), (n, k)
    (m,) = res["models"]
    impls = [r["impl"] for r in m["rows"]]
    assert impls[:2] == ["bandwidth ceiling", "tritlm packed (head t4, kv f16)"] and m["kv_dtype"] == "f16"
    assert "torch dense bf16" in impls and ("llama-cpp-python TQ2_0 (head Q8_0)" in impls) == available()
    assert ("llama-bench TQ2_0 (head Q8_0)" in impls) == (llama_bench_binary() is not None)
    for r in m["rows"][1:2] + [r for r in m["rows"] if r["impl"].startswith("llama-bench")]:
        assert r["decode_runs"] == 2 and r["decode_range"][0] <= r["decode"] <= r["decode_range"][1]
    for r in m["rows"]:
        assert r["decode"] > 0 and (r["prefill"] is None or r["prefill"] > 0)
    ours = m["rows"][1]
    assert 0 < ours["native_share"] <= 1
    ceil = m["rows"][0]
    assert ceil["read_GBps_range"][0] <= ceil["read_GBps"] <= ceil["read_GBps_range"][1]
    assert ceil["decode"] == pytest.approx(ceil["read_GBps"] * 1e9 / m["bytes_per_decode_token"])
    # each repetition's decode over its own ceiling: between the extremes of those ratios
    share = next(q for q in m["ratios"] if q["vs"] == "bandwidth ceiling")
    assert share["decode"] == ours["ceiling_share"] and share["prefill"] is None
    lo, hi = ours["decode_range"]
    bw_lo, bw_hi = ceil["read_GBps_range"]
    per = m["bytes_per_decode_token"]
    assert lo * per / (bw_hi * 1e9) * (1 - 1e-9) <= share["decode"] <= hi * per / (bw_lo * 1e9) * (1 + 1e-9)
    bf16 = next(r for r in m["rows"] if r["impl"] == "torch dense bf16")
    q = next(q for q in m["ratios"] if q["vs"] == "torch dense bf16")
    assert q["decode"] == pytest.approx(ours["decode"] / bf16["decode"])
    json.dumps(res)  # what `tritlm bench --json` prints
    from tritlm.cli_runtime import bench_lines

    lines = bench_lines(res)
    assert lines[0].startswith("# tritlm bench") and any("tritlm / torch dense bf16" in x for x in lines)
    assert any("tritlm / bandwidth ceiling" in x for x in lines)
