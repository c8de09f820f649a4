"""Packed CPU runtime: pack format, engine logits vs the training model, batching, API, registry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_model  # noqa: E402  (tests/infer helper)

import tritlm
from tritlm.formats.packed import (
    from_transformer,
    is_packed,
    linear_shapes,
    load_packed,
    pack_checkpoint,
    random_packed,
    save_packed,
    size_report,
)
from tritlm.infer.engine import Engine
from tritlm.infer.sampling import SamplingParams
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.quant.config import QuantConfig

GREEDY = SamplingParams(temperature=0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().detach())


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny ternary model trained for 60 steps with the real CLI (the fixture the issue asks for)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    subprocess.run([sys.executable, "-m", "tritlm", "train", "--preset", "tiny", "--max-steps", "60",
                    "--out", str(out), "--quiet", "--set", "eval_batches=2", "--set", "tensorboard=false"],
                   check=True, capture_output=True)
    return out


def _model(**kw) -> Transformer:
    return tiny_model(**kw)


@pytest.mark.parametrize("kw", [
    {},
    {"n_kv_heads": 2, "qk_norm": True},
    {"mlp": "relu2", "sub_norm": True, "tie_embeddings": True, "residual_scale": 0.7},
    {"quant": QuantConfig(input_norm=True)},
], ids=["base", "gqa-qknorm", "relu2-subln-tied", "input-norm"])
def test_engine_matches_training_forward(kw):
    m = _model(**kw)
    # f32 K/V: the packed math against the training forward (the fp16 cache: test_infer_kv_cache)
    eng = Engine(from_transformer(m, fp_dtype="fp32"), slots=2, kv_dtype="f32")
    ids = torch.randint(0, 97, (30,)).tolist()
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0][0]
    assert rel_err(eng.logits(ids), ref) < 1e-2
    # incremental: prefill 20 then decode 10 one by one gives the same last logits
    eng.reset()
    eng.prefill(ids[:20])
    for t in ids[20:]:
        last = eng.forward_seq([t])[-1]
    assert rel_err(last, ref[-1]) < 1e-2


def test_batch_decode_matches_single():
    m = _model(n_kv_heads=2)
    pm = from_transformer(m, fp_dtype="fp32")
    prompts = [[1, 2, 3, 4, 5], [9, 8], [7, 7, 7, 7, 7, 7, 7, 7]]
    single = Engine(pm)
    want = [list(single.generate(p, 12, GREEDY)) for p in prompts]
    batched = Engine(pm, slots=3)
    assert batched.generate_batch(prompts, 12, GREEDY) == want


def test_pack_roundtrip_and_size(tmp_path):
    m = _model()
    pm = from_transformer(m)
    out = save_packed(pm, tmp_path / "p")
    assert is_packed(out) and not list(tmp_path.glob(".p.tmp-*"))
    pm2 = load_packed(out)
    for name, pl in pm.linears.items():
        p2 = pm2.linears[name]
        assert p2.kind == pl.kind == "ternary"
        assert (p2.weights.data == pl.weights.data).all() and (p2.scale == pl.scale).all()
    rep = size_report(pm2, out)
    assert rep["overhead_pct"] < 2.0
    with pytest.raises(tritlm.errors.FormatError):
        save_packed(pm, out)  # no silent overwrite


def test_pack_size_700m_shape():
    """2 bits per ternary weight: the 700M shape packs with no padding at all (dims are x128)."""
    cfg = ModelConfig(dim=1536, n_layers=1, n_heads=16, ffn_dim=4096, vocab_size=32000)
    n = sum(a * b for a, b in linear_shapes(cfg).values())
    from tritlm.kernels.pack import pack_ternary_kernel
    assert sum(pack_ternary_kernel(torch.zeros(a, b, dtype=torch.int8).numpy()).nbytes
               for a, b in linear_shapes(cfg).values()) == n // 4


def test_t4_head_is_close():
    pm = random_packed(ModelConfig(vocab_size=300, dim=128, n_layers=1, n_heads=4, ffn_dim=256, max_seq_len=32))
    ids = [1, 5, 9, 200]
    exact = Engine(pm).logits(ids)
    approx = Engine(pm, head="t4").logits(ids)
    assert rel_err(approx, exact) < 3e-2


@pytest.mark.parametrize("kind, tol", [("q8", 1.5e-2), ("q4", 1.5e-1)])
def test_int_heads_match_their_reference_and_stay_close(kind, tol):
    """q8 / q4 heads: the int kernels' results are the quantised head's own float math (int8
    per-row / int4 per-32 levels, int8 activations per token), and they stay near the exact head;
    q8 is within t4's error."""
    from tritlm.nn.packed_linear import int_head, pack_levels
    from tritlm.nn.runtime import RuntimeHead
    from tritlm.quant.config import QuantConfig
    from tritlm.quant.weights import quantize_weight

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(301, 160, generator=g) * 0.05).half()  # odd vocabulary, K not a multiple of 32 * 4
    x = torch.randn(5, 160, generator=g)
    cfg = {"q8": QuantConfig(weight="int8"), "q4": QuantConfig(weight="int4", group_size=32)}[kind]
    ref = pack_levels(*quantize_weight(w.float(), cfg), cfg).reference(x)
    head = RuntimeHead(w, kind)
    got = head(x)
    assert got.shape == (5, 301) and rel_err(got, ref) < 1e-5
    assert rel_err(int_head(w, kind)(x, torch.empty(5, 301)), ref) < 1e-5
    assert rel_err(got, x @ w.float().t()) < tol
    pm = random_packed(ModelConfig(vocab_size=300, dim=128, n_layers=1, n_heads=4, ffn_dim=256, max_seq_len=32))
    ids = [1, 5, 9, 200]
    exact = Engine(pm).logits(ids)
    eng = Engine(pm, head=kind)
    assert eng.head_kind == kind and rel_err(eng.logits(ids), exact) < 2 * tol


def test_f16_head_is_the_default_and_exact():
    pm = from_transformer(_model(), fp_dtype="fp16")
    ids = list(range(1, 30))
    auto, fp32 = Engine(pm), Engine(pm, head="fp32")
    assert auto.head_kind == "f16" and Engine(from_transformer(_model(), fp_dtype="fp32")).head_kind == "fp32"
    # the same fp16 weights, read as fp16 instead of a float32 copy: only summation order differs
    assert rel_err(auto.logits(ids), fp32.logits(ids)) < 1e-5
    with pytest.raises(ValueError, match="head must be one of"):
        Engine(pm, head="q2")


def test_dense_backends_match_packed():
    pm = from_transformer(_model(), fp_dtype="fp32")
    ids = list(range(1, 20))
    ref = Engine(pm).logits(ids)
    # dense F.linear skips the int8 activation rounding: close, not identical
    assert rel_err(Engine(pm, backend="dense").logits(ids), ref) < 5e-2
    assert rel_err(Engine(pm, backend="dense", dense_dtype=torch.bfloat16).logits(ids), ref) < 8e-2


def test_prefix_reuse_in_slot():
    pm = from_transformer(_model(), fp_dtype="fp32")
    eng = Engine(pm)
    a = eng.prefill([1, 2, 3, 4, 5, 6])
    before = eng.stats.prefill_tokens
    b = eng.prefill([1, 2, 3, 4, 5, 6])  # only the last token runs again
    assert eng.stats.prefill_tokens == before and eng.stats.decode_tokens == 1
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow  # trains for 60 steps: ~2 min alone, much more on a shared box
def test_trained_checkpoint_pack_load_generate(trained, tmp_path, monkeypatch):
    path, rep = pack_checkpoint(trained, tmp_path / "packed32", fp_dtype="fp32")
    ref_m = tritlm.load(trained)
    m = tritlm.load(path)
    assert m.source == "packed"
    ids = ref_m.tokenizer.encode("ROMEO:\nWhat say you to this")
    assert rel_err(m.logits(ids), ref_m.logits(ids)) < 1e-2
    assert list(m.generate_ids(ids, 40, GREEDY)) == list(ref_m.generate_ids(ids, 40, GREEDY))
    assert m.generate("ROMEO:", 20, temperature=0) == ref_m.generate("ROMEO:", 20, temperature=0)
    # the default fp16 pack: within tolerance too
    path16, rep16 = pack_checkpoint(trained, tmp_path / "packed16")
    assert rel_err(tritlm.load(path16).logits(ids), ref_m.logits(ids)) < 1e-2
    assert rep16["weight_bytes"] < rep["weight_bytes"]
    # registry: load by name, and the CLI writes the same packed folder
    monkeypatch.setenv("TRITLM_MODELS", str(tmp_path / "models.json"))
    from tritlm.registry import register
    register("tiny-test", path)
    assert tritlm.load("tiny-test").source == "packed"
    r = subprocess.run([sys.executable, "-m", "tritlm", "pack", str(trained), str(tmp_path / "cli")],
                       capture_output=True, text=True, check=True)
    # tiny's FFN of 344 pads to 384 in the kernel layout, so only the 700M-shape test checks < 2%
    assert json.loads(r.stdout)["weight_bytes"] == rep16["weight_bytes"]
    assert is_packed(tmp_path / "cli")


@pytest.mark.parametrize("packed", [False, True])
def test_api_generate_stops_at_stop_strings(packed):
    from tritlm.api import LoadedModel
    from tritlm.data.tokenizer import CharTokenizer

    tok = CharTokenizer([chr(33 + i) for i in range(97)])
    m = _model()
    if packed:
        eng = Engine(from_transformer(m, tok, fp_dtype="fp32"))
        lm = LoadedModel(eng, tok, None, "packed", engine=eng)
    else:
        lm = LoadedModel(m, tok, None, "checkpoint")
    full = lm.generate("abc", 30, temperature=0)
    assert len(full) == 30
    stop = full[12:14]
    cut = full.find(stop)
    assert lm.generate("abc", 30, temperature=0, stop=[stop, "never-there"]) == full[:cut]
    assert lm.generate("abc", 30, temperature=0, stop=["never-there"]) == full
    if packed:  # the generation was closed at the stop: another thread can take the engine now
        import threading

        got = []

        def probe():
            got.append(eng.lock.acquire(blocking=False))
            if got[-1]:
                eng.lock.release()

        th = threading.Thread(target=probe)
        th.start()
        th.join()
        assert got == [True]
