"""Per-layer kinds end to end: a mixed model trained with the real CLI, reloaded, packed (format v2)
and run by the packed CPU runtime with the training model's logits; v1 folders; sizes; bad records."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tritlm.errors import FormatError
from tritlm.formats.native import load_native
from tritlm.formats.packed import from_transformer, load_packed, pack_model, random_packed, save_packed, size_report
from tritlm.infer.engine import Engine
from tritlm.infer.sampling import SamplingParams
from tritlm.model.config import ModelConfig, quant_overrides_from
from tritlm.model.transformer import Transformer
from tritlm.nn import BitLinear

# int8 attention, int4 down projections, per-channel binary / ternary and one FP layer.
SPEC = {"layers.0.self_attn.*": "int8", "*.down_proj": {"weight": "int4", "group_size": 32},
        "layers.1.mlp.gate_proj": {"weight": "binary", "scale": "channel"},
        "layers.1.mlp.up_proj": {"weight": "binary", "scale": "channel"},
        "layers.2.self_attn.o_proj": "fp", "layers.3.self_attn.q_proj": "int8",  # q int8 next to ternary k, v
        "layers.3.*": {"scale": "channel"}}
# Every q|k|v and gate|up group shares one kind: the fused C decode step runs it.
FUSABLE = {"layers.*.self_attn.*": "int8", "*.down_proj": {"weight": "int4", "group_size": 64}}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny preset trained 20 steps with a mixed --quant-spec through the CLI."""
    root = tmp_path_factory.mktemp("mixed")
    spec = root / "spec.yaml"
    spec.write_text("\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in SPEC.items()) + "\n")
    out = root / "run"
    subprocess.run([sys.executable, "-m", "tritlm", "train", "--preset", "tiny", "--max-steps", "20",
                    "--out", str(out), "--quiet", "--quant-spec", str(spec), "--threads", "1",
                    "--set", "eval_batches=2", "--set", "tensorboard=false"], check=True, capture_output=True)
    return out


def test_trained_mixed_model_reloads_packs_and_runs(trained, tmp_path):
    model, tok, _ = load_native(trained)
    kinds = {n: (model.get_submodule(n).config.kind if isinstance(model.get_submodule(n), BitLinear) else "fp")
             for n in model.cfg.linear_names()}
    assert kinds["layers.0.self_attn.q_proj"] == "int8" and kinds["layers.0.mlp.down_proj"] == "int4-g32"
    assert kinds["layers.1.mlp.gate_proj"] == "binary-ch" and kinds["layers.2.self_attn.o_proj"] == "fp"
    assert kinds["layers.3.self_attn.k_proj"] == "ternary-ch" and kinds["layers.2.mlp.up_proj"] == "ternary"
    assert kinds["layers.3.self_attn.q_proj"] == "int8"
    path, rep = pack_model(trained, tmp_path / "packed", fp_dtype="fp32")
    pm = load_packed(path)
    assert pm.config == model.cfg  # the spec travels with the packed model
    assert pm.kinds()["layers.0.self_attn.v_proj"] == "int8" and pm.kinds()["layers.2.self_attn.o_proj"] == "fp32"
    assert set(rep["kinds"]) == {"int8", "int4", "binary", "ternary", "fp32"}
    eng = Engine(pm)
    ids = tok.encode("ROMEO: But soft, what light through yonder window breaks?")[:60]
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0]
    got = eng.logits(ids)
    # the kernels compute what the training forward computes, up to float rounding and the odd
    # int8 activation that lands on the other side of a rounding boundary
    assert rel_err(got, ref) < 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    eng.reset()
    eng.prefill(ids[:40])
    for t in ids[40:]:
        last = eng.forward_seq([t])[-1]
    assert rel_err(last, ref[-1]) < 1e-2


def _mixed(spec, **kw) -> Transformer:
    base = ModelConfig(vocab_size=97, dim=128, n_layers=4, n_heads=4, ffn_dim=256, max_seq_len=96, **kw)
    torch.manual_seed(0)
    return Transformer(base.replace(quant_overrides=quant_overrides_from(spec, base.quant))).eval()


@pytest.mark.parametrize("spec", [FUSABLE, SPEC], ids=["fusable", "split-groups"])
def test_fused_decode_with_mixed_kinds_matches_torch_path(spec):
    m = _mixed(spec, n_kv_heads=2)
    pm = from_transformer(m, fp_dtype="fp32")
    fused, torch_path = Engine(pm), Engine(pm, fused=False)
    if spec is FUSABLE:
        assert fused.fused is not None  # one C call per token, int8 / int4 / ternary contexts mixed
    else:
        assert fused.fused is None  # mixed q|k|v groups or an fp layer: the per-layer path
    ids = torch.randint(0, 97, (40,)).tolist()
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0][0]
    for eng in (fused, torch_path):
        eng.prefill(ids[:30])
        for t in ids[30:]:
            last = eng.forward_seq([t])[-1]
        assert rel_err(last, ref[-1]) < 1e-2
    fused.reset(), torch_path.reset()
    greedy = SamplingParams(temperature=0)
    a = list(fused.generate(ids[:5], 20, greedy))
    b = list(torch_path.generate(ids[:5], 20, greedy))
    assert a == b


def test_dense_backend_uses_each_kind():
    m = _mixed(SPEC)
    pm = from_transformer(m, fp_dtype="fp32")
    ids = torch.randint(0, 97, (20,)).tolist()
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0][0]
    # the dense baseline skips activation quantisation: close, not equal
    assert rel_err(Engine(pm, backend="dense").logits(ids), ref) < 0.1


def test_v1_packed_folder_still_loads(tmp_path):
    m = _mixed({})  # all ternary, per-tensor scales: what format v1 held
    pm = from_transformer(m, fp_dtype="fp32")
    v2 = save_packed(pm, tmp_path / "v2")
    tensors = load_file(str(v2 / "model.safetensors"))
    meta = json.loads((v2 / "config.json").read_text())
    v1 = tmp_path / "v1"
    v1.mkdir()
    save_file(tensors, str(v1 / "model.safetensors"), metadata={"format": "tritlm-packed"})
    meta.pop("quant_overrides", None)
    old = {"format": "tritlm-packed", "version": 1, "model": {k: v for k, v in meta["model"].items()
                                                               if k != "quant_overrides"},
           "fp_dtype": "fp32", "shapes": {n: r["shape"] for n, r in meta["tensors"].items()}}
    (v1 / "config.json").write_text(json.dumps(old))
    a, b = load_packed(v1), load_packed(v2)
    assert a.meta["version"] == 1 and b.meta["version"] == 2
    assert a.kinds() == b.kinds() == {n: "ternary" for n in m.cfg.linear_names()}
    ids = list(range(1, 30))
    assert torch.equal(Engine(a).logits(ids), Engine(b).logits(ids))


def test_bytes_within_two_percent_of_each_kinds_ideal():
    cfg = ModelConfig(vocab_size=256, dim=256, n_layers=2, n_heads=4, ffn_dim=512, max_seq_len=64)
    spec = {"layers.0.self_attn.*": "int8", "*.down_proj": {"weight": "int4", "group_size": 32},
            "layers.1.self_attn.*": {"weight": "binary", "scale": "channel"}}
    pm = random_packed(cfg.replace(quant_overrides=quant_overrides_from(spec, cfg.quant)))
    rep = size_report(pm)
    assert set(rep["kinds"]) == {"int8", "int4", "binary", "ternary"}
    for kind, e in rep["kinds"].items():
        assert e["bytes"] <= 1.02 * e["ideal_bytes"], kind
    # the ideal itself, from first principles: bits per weight + float32 scales
    int4 = rep["kinds"]["int4"]
    assert int4["ideal_bytes"] == 2 * (256 * 512 / 2 + 4 * 256 * (512 // 32))
    assert rep["overhead_pct"] < 2.0


@pytest.mark.parametrize("edit", ["shape", "kind", "scale", "group", "dtype", "missing"])
def test_bad_v2_records_are_format_errors(tmp_path, edit):
    pm = from_transformer(_mixed(SPEC), fp_dtype="fp32")
    p = save_packed(pm, tmp_path / "m")
    meta = json.loads((p / "config.json").read_text())
    tensors = load_file(str(p / "model.safetensors"))
    name = "layers.0.mlp.down_proj"
    if edit == "shape":
        meta["tensors"][name]["shape"] = [128, 999]
    elif edit == "kind":
        meta["tensors"][name]["kind"] = "int3"
    elif edit == "scale":
        tensors[f"{name}.scale"] = torch.ones(3)
    elif edit == "group":
        meta["tensors"][name]["group_size"] = 48
    elif edit == "dtype":
        tensors[f"{name}.qweight"] = tensors[f"{name}.qweight"].to(torch.int16)
    else:
        del meta["tensors"][name]
    (p / "config.json").write_text(json.dumps(meta))
    save_file(tensors, str(p / "model.safetensors"))
    with pytest.raises(FormatError):
        load_packed(p)


def test_post_training_spec_at_pack_time(trained, tmp_path):
    """tritlm pack --quant-spec: re-quantise a trained model's layers to other kinds (PTQ)."""
    model, tok, _ = load_native(trained)
    spec = {"layers.*.mlp.*": "int8"}
    _, rep = pack_model(trained, tmp_path / "p", fp_dtype="fp32", quant_spec=spec)
    pm = load_packed(tmp_path / "p")
    assert all(k == "int8" for n, k in pm.kinds().items() if ".mlp." in n)
    assert pm.kinds()["layers.0.self_attn.q_proj"] == "int8"  # from the trained spec, unchanged
    # an int8 layer quantised from a trained layer's effective weights stays close to it
    ids = tok.encode("ROMEO: But soft")
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0][0]
    assert rel_err(Engine(pm).logits(ids), ref) < 0.1
    assert np.isfinite(rep["overhead_pct"])


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "tritlm", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def test_cli_pack_info_inspect_show_per_layer_kinds(trained, tmp_path):
    spec = tmp_path / "ptq.yaml"
    spec.write_text('"layers.2.mlp.*": {weight: int4, group_size: 128}\n')
    _cli("pack", trained, tmp_path / "p", "--quant-spec", spec)
    info = _cli("info", tmp_path / "p", "--layers").stdout
    assert "int4-g128" in info and "binary-ch" in info and "layers.2.mlp.gate_proj" in info
    doc = json.loads(_cli("inspect", tmp_path / "p", "--all").stdout)
    assert doc["version"] == 2 and doc["tensors"]["layers.2.mlp.up_proj"]["kind"] == "int4"
    assert doc["tensors"]["layers.2.mlp.up_proj"]["group_size"] == 128
    assert doc["tensors"]["layers.0.self_attn.q_proj"]["bits"] == 8
    out = _cli("generate", tmp_path / "p", "--prompt", "ROMEO:", "--max-tokens", "8", "--seed", "1").stdout
    assert out.startswith("ROMEO:")


@pytest.mark.parametrize("text", ['"x.*": {weight: int3}\n', "- a\n- b\n", '"x": {colour: red}\n', ":\n  - [\n"])
def test_bad_spec_files_give_one_line_errors(tmp_path, text):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    r = _cli("train", "--preset", "tiny", "--max-steps", "1", "--out", tmp_path / "r", "--quant-spec", spec,
             check=False)
    assert r.returncode == 2 and r.stderr.startswith("tritlm: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_base3_ternary_storage_runs_like_i2s(tmp_path):
    """--ternary-layout base3: 1.6 bits a ternary weight on disk, the same model when loaded."""
    m = _mixed(FUSABLE)  # int8 attention, int4 down, ternary gate/up
    a = save_packed(from_transformer(m, fp_dtype="fp32"), tmp_path / "i2s")
    b = save_packed(from_transformer(m, fp_dtype="fp32", ternary_layout="base3"), tmp_path / "b3")
    pa, pb = load_packed(a), load_packed(b)
    name = "layers.0.mlp.gate_proj"
    assert pb.linears[name].layout == "base3" and pb.linears[name].bits == 1.6
    assert np.array_equal(pb.linears[name].levels(), pa.linears[name].levels())
    ra, rb = size_report(pa)["kinds"]["ternary"], size_report(pb)["kinds"]["ternary"]
    assert rb["bytes"] <= 1.02 * rb["ideal_bytes"] and rb["bytes"] < 0.85 * ra["bytes"]
    ids = list(range(3, 40))
    ea, eb = Engine(pa), Engine(pb)
    assert eb.fused is not None  # unpacked to the kernels' layout at load: the fused step runs it
    assert torch.equal(ea.logits(ids), eb.logits(ids))
    # a byte >= 243 cannot be a base-3 group of 5 weights
    t = load_file(str(b / "model.safetensors"))
    t[f"{name}.qweight"][0, 0] = 250
    save_file(t, str(b / "model.safetensors"))
    with pytest.raises(FormatError):
        load_packed(b)


def test_bench_takes_a_packed_folder_and_ids_are_checked(trained, tmp_path):
    from tritlm.infer.profile import bench_model

    path, _ = pack_model(trained, tmp_path / "p")
    res = bench_model(str(path), [1], decode_tokens=4, prompt_tokens=8, dense=False)
    ours = next(r for r in res["rows"] if r["impl"].startswith("tritlm packed"))
    assert ours["decode"] > 0 and ours["prefill"] > 0 and "int8" in res["kinds"]
    eng = Engine(load_packed(path))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        eng.forward_seq([1, 2, eng.cfg.vocab_size])


def _corrupt_variants():
    def cfg_json(p, fn):
        meta = json.loads((p / "config.json").read_text())
        (p / "config.json").write_text(json.dumps(fn(meta)))

    def model_key(key, value):
        def f(meta):
            meta["model"][key] = value
            return meta
        return f

    def tensors(fn):
        def edit(p):
            t = load_file(str(p / "model.safetensors"))
            fn(t)
            save_file(t, str(p / "model.safetensors"))
        return edit

    return {
        "empty-weights": lambda p: (p / "model.safetensors").write_bytes(b""),
        "truncated-weights": lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:1000]),
        "config-list": lambda p: cfg_json(p, lambda m: {"format": "tritlm-packed", "version": 2, "model": []}),
        "config-no-model": lambda p: cfg_json(p, lambda m: {k: v for k, v in m.items() if k != "model"}),
        "config-no-tensors": lambda p: cfg_json(p, lambda m: {k: v for k, v in m.items() if k != "tensors"}),
        "n_kv_heads=-1": lambda p: cfg_json(p, model_key("n_kv_heads", -1)),
        "norm_eps=x": lambda p: cfg_json(p, model_key("norm_eps", "x")),
        "dim=1e9": lambda p: cfg_json(p, model_key("dim", 10 ** 9)),
        "n_layers=1e6": lambda p: cfg_json(p, model_key("n_layers", 10 ** 6)),
        "max_seq_len=1e9": lambda p: cfg_json(p, model_key("max_seq_len", 10 ** 9)),
        "act_bits=str": lambda p: cfg_json(p, lambda m: {**m, "model": {**m["model"], "quant": {
            **m["model"]["quant"], "act_bits": "8"}}}),
        "version-str": lambda p: cfg_json(p, lambda m: {**m, "version": "2"}),
        "embed-shape": tensors(lambda t: t.__setitem__("embed_tokens.weight", torch.zeros(3, 3))),
        "norm-missing": tensors(lambda t: t.pop("norm.weight")),
        "nan-embed": tensors(lambda t: t["embed_tokens.weight"].__setitem__((0, 0), float("nan"))),
        "inf-scale": tensors(lambda t: t["layers.0.mlp.up_proj.scale"].fill_(float("inf"))),
        "extra-tensor": tensors(lambda t: t.__setitem__("evil", torch.zeros(1))),
    }


@pytest.mark.parametrize("variant", list(_corrupt_variants()))
def test_corrupt_packed_folders_are_one_line_errors(tmp_path, variant):
    """Issue 10: packed folders are what `tritlm serve` is given; every corruption is a FormatError
    (the CLI prints one line), found before anything is built or allocated from the metadata."""
    p = save_packed(from_transformer(_mixed(FUSABLE), fp_dtype="fp32"), tmp_path / "m")
    _corrupt_variants()[variant](p)
    with pytest.raises(FormatError):
        load_packed(p)
