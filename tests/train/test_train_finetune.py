"""`tritlm finetune`: the student starts as the source (checked against transformers itself), the
teacher stays frozen, the losses match float64 math, and the result resumes, packs and exports."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_e2e import run_cli, train_losses  # noqa: E402  (tests/train helper)

from tritlm.nn import set_quant_state
from tritlm.train.config import load_config
from tritlm.train.finetune import (
    fit_sub_norm_gains,
    init_student,
    kl_teacher_student,
    load_source,
    normalised_mse,
    student_config,
)
from tritlm.train.schedule import QuantSchedule, lam_at

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
          "You are all resolved rather to die than to famish? ") * 60
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    """A tiny random transformers LlamaForCausalLM folder with its own BPE tokenizer and chat template."""
    transformers = pytest.importorskip("transformers")
    from tritlm.data.tokenizer import HFTokenizer

    out = tmp_path_factory.mktemp("src")
    tok = HFTokenizer.train_bpe(CORPUS, 300)
    tok.tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(out)
    (out.parent / "corpus.txt").write_text(CORPUS)
    return out, m, tok


def _cfg(**kw):
    return load_config(None, [f"{k}={v}" for k, v in kw.items()])


def test_lambda_schedules_match_their_formulas():
    T = 200
    lin = QuantSchedule(lam_warmup_steps=50)
    assert [lam_at(t, lin, T) for t in (0, 10, 49, 50, 199)] == [0.0, 0.2, 0.98, 1.0, 1.0]
    half = QuantSchedule(lam_warmup_frac=0.5)  # min(2t/T, 1)
    for t in (0, 37, 99, 100, 150):
        assert lam_at(t, half, T) == pytest.approx(min(2 * t / T, 1.0))
    k = 6.0
    sig = QuantSchedule(lam_warmup_steps=100, lam_schedule="sigmoid", lam_k=k)
    s = lambda u: 1 / (1 + math.exp(-k * (u - 0.5)))  # noqa: E731
    for t in (0, 25, 50, 90):
        assert lam_at(t, sig, T) == pytest.approx((s(t / 100) - s(0)) / (s(1) - s(0)), rel=1e-12)
    exp = QuantSchedule(lam_warmup_steps=100, lam_schedule="exponential", lam_k=k)
    for t in (0, 25, 50, 90):
        assert lam_at(t, exp, T) == pytest.approx((math.exp(k * t / 100) - 1) / (math.exp(k) - 1), rel=1e-12)
    for qs in (lin, half, sig, exp):
        vals = [lam_at(t, qs, T) for t in range(T)]
        assert vals[0] == 0.0 and vals[-1] == 1.0 and all(a <= b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("sub_norm", [False, True])
def test_at_lambda_zero_the_student_is_the_source(hf_source, sub_norm):
    path, hf_model, tok = hf_source
    source, src_tok = load_source(str(path))
    assert src_tok.fingerprint() == tok.fingerprint() and src_tok.chat_template == TEMPLATE
    cfg = _cfg(**{"finetune.source": str(path), "finetune.sub_norm": str(sub_norm).lower()})
    from tritlm.model.transformer import Transformer

    mcfg = student_config(source.cfg, cfg)
    assert mcfg.quant.weight == "ternary" and mcfg.sub_norm == sub_norm
    student = Transformer(mcfg)
    init_student(student, source, inserted_sub_norm=sub_norm)
    ids = torch.tensor([tok.encode(CORPUS[:200])[:40]])
    if sub_norm:
        fit_sub_norm_gains(student, source, [ids])
    student.eval()
    with torch.no_grad():
        ref = hf_model(ids).logits  # transformers itself: an independent implementation
        set_quant_state(student, lam=0.0)
        got0 = student(ids)[0]
        set_quant_state(student, lam=1.0)
        got1 = student(ids)[0]
    assert torch.allclose(got0, ref, rtol=1e-5, atol=1e-5), (got0 - ref).abs().max()
    assert (got1 - ref).abs().max() > 1e-3  # fully quantised is really different


def test_sub_norm_gains_are_the_least_squares_fit(hf_source):
    path, _, tok = hf_source
    source, _ = load_source(str(path))
    from tritlm.model.transformer import Transformer

    cfg = _cfg(**{"finetune.source": str(path), "finetune.sub_norm": "true"})
    student = Transformer(student_config(source.cfg, cfg))
    init_student(student, source, inserted_sub_norm=True)
    ids = torch.tensor([tok.encode(CORPUS)[:64]])
    captured = []
    h = source.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    resid = fit_sub_norm_gains(student, source, [ids])
    source(ids)
    h.remove()
    x = captured[0].double().reshape(-1, captured[0].shape[-1]).numpy()
    n = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6)
    g = (x * n).sum(0) / (n * n).sum(0)  # float64 normal equations, per channel
    got = student.layers[1].mlp.ffn_sub_norm.weight.detach().double().numpy()
    assert np.allclose(got, g, rtol=1e-4)
    r = np.sqrt(((x - g * n) ** 2).sum() / (x ** 2).sum())
    assert resid["layers.1.mlp.ffn_sub_norm"] == pytest.approx(r, rel=1e-3)


def test_kl_and_hidden_mse_match_float64():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    tau = 2.0
    tn, sn = t.double().numpy() / tau, s.double().numpy() / tau
    pt = np.exp(tn - tn.max(-1, keepdims=True))
    pt /= pt.sum(-1, keepdims=True)
    ls = sn - sn.max(-1, keepdims=True)
    ls -= np.log(np.exp(ls).sum(-1, keepdims=True))
    ref = (pt * (np.log(pt) - ls)).sum(-1).mean() * tau * tau
    assert float(kl_teacher_student(t, s, tau)) == pytest.approx(ref, rel=1e-5)
    assert float(kl_teacher_student(t, t, tau)) == pytest.approx(0.0, abs=1e-6)
    hs = [torch.randn(2, 5, 7, generator=g) for _ in range(3)]
    ht = [torch.randn(2, 5, 7, generator=g) for _ in range(3)]
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    ref = np.mean([((unit(a.double().numpy()) - unit(b.double().numpy())) ** 2).sum(-1).mean()
                   for a, b in zip(ht, hs)])
    assert float(normalised_mse(ht, hs)) == pytest.approx(ref, rel=1e-5)


def test_distiller_loss_is_ce_plus_weighted_terms_and_the_teacher_gets_no_gradient(hf_source):
    from tritlm.model.transformer import Transformer
    from tritlm.train.config import FinetuneConfig
    from tritlm.train.finetune import Distiller

    path, _, tok = hf_source
    teacher, _ = load_source(str(path))
    student = Transformer(student_config(teacher.cfg, _cfg(**{"finetune.source": str(path)})))
    init_student(student, teacher, inserted_sub_norm=False)
    ids = torch.tensor([tok.encode(CORPUS)[:33]])
    x, y = ids[:, :-1], ids[:, 1:]
    d = Distiller(teacher, FinetuneConfig(source=str(path), distill_alpha=0.7, distill_tau=2.0, hidden_mse=0.3),
                  student)
    loss = d(student, x, y)
    hs, ht = [], []
    hooks = [m.register_forward_hook(lambda _m, _a, o, acc=acc: acc.append(o))
             for model, acc in ((student, hs), (teacher, ht)) for m in model.layers]
    s_logits, ce = student(x, y)
    with torch.no_grad():
        t_logits, _ = teacher(x)
    for h in hooks:
        h.remove()
    ref = ce + 0.7 * kl_teacher_student(t_logits, s_logits, 2.0) + 0.3 * normalised_mse(ht, hs)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6) and float(loss) > float(ce)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_architecture_changes_and_sourceless_options_are_refused(hf_source):
    from tritlm.errors import ConfigError

    path, _, _ = hf_source
    source, _ = load_source(str(path))
    with pytest.raises(ConfigError, match="model.dim"):
        student_config(source.cfg, _cfg(**{"finetune.source": str(path), "model.dim": 128}))
    with pytest.raises(ConfigError, match="need finetune.source"):
        _cfg(**{"finetune.distill_alpha": 1.0})
    with pytest.raises(ConfigError, match="lam_schedule"):
        _cfg(**{"quant_schedule.lam_schedule": "cubic"})


FT = ["--batch-size", "4", "--block-size", "32", "--threads", "1", "--quiet", "--set", "eval_batches=2",
      "--set", "log_interval=1", "--set", "tensorboard=false", "--set", "optim.warmup_steps=2",
      "--set", "finetune.hidden_mse=0.5", "--set", "finetune.sub_norm=true"]


def test_finetune_cli_resumes_exactly_keeps_the_tokenizer_and_the_teacher_frozen(hf_source, tmp_path):
    path, _, tok = hf_source
    corpus = str(path.parent / "corpus.txt")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli(["finetune", str(path), "--out", str(full), "--data", corpus, "--max-steps", "6", *FT,
             "--set", "ckpt_interval=3"])
    # a run killed after its step-3 save: the same folder without the later checkpoint
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    run_cli(["finetune", str(path), "--out", str(cut), "--data", corpus, "--max-steps", "6", *FT,
             "--set", "ckpt_interval=3", "--resume"])
    assert train_losses(cut) == train_losses(full) and len(train_losses(full)) == 6

    import tritlm

    m = tritlm.load(str(full))
    assert m.tokenizer.fingerprint() == tok.fingerprint()
    assert m.tokenizer.chat_template == TEMPLATE
    assert m.config.quant.weight == "ternary" and m.config.sub_norm

    packed = tmp_path / "packed"
    run_cli(["pack", str(full), str(packed)])
    run_cli(["export", str(full), str(tmp_path / "m.gguf"), "--format", "gguf-tq2_0"])
    run_cli(["export", str(full), str(tmp_path / "hf"), "--format", "hf"])  # BitNetForCausalLM (SubLN)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "bitnet"
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    r = run_cli(["eval", str(packed), "--data", corpus, "--ctx", "32", "--json"])
    assert math.isfinite(json.loads(r.stdout)["ppl"])


def test_finetune_refuses_a_source_without_tokenizer(hf_source, tmp_path):
    path, _, _ = hf_source
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((path / f).read_bytes())
    r = run_cli(["finetune", str(bare), "--out", str(tmp_path / "o"), "--data", str(path.parent / "corpus.txt"),
                 "--max-steps", "2", "--quiet"], check=False)
    assert r.returncode == 2 and "no tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_the_shipped_recipe_is_the_commands_default():
    from tritlm.cli_finetune import FINETUNE_DEFAULTS

    src = {"finetune.source": "x"}
    shipped = load_config(ROOT / "configs" / "finetune-ternary.yaml", base=FINETUNE_DEFAULTS, **src)
    assert shipped == load_config(None, base=FINETUNE_DEFAULTS, **src)
    assert shipped == load_config(ROOT / "configs" / "finetune-ternary.yaml", **src)
