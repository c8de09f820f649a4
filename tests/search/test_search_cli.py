"""`tritlm search` end to end: the spec it writes round-trips and packs to exactly the predicted
bytes; a Pareto folder and a short fine-tune; bad input is one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tritlm.cli import main
from tritlm.formats import checkpoint as ck
from tritlm.model.config import ATTN_LINEARS, MLP_LINEARS, load_quant_spec, quant_overrides_from
from tritlm.quant.config import FP, QuantConfig
from tritlm.search.units import make_units, option, parse_options, size_table

LINEARS = [f"self_attn.{n}" for n in ATTN_LINEARS] + [f"mlp.{n}" for n in MLP_LINEARS]


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory):
    model, tok, _, _, text = tiny
    d = tmp_path_factory.mktemp("search")
    ck.save_checkpoint(d / "ckpt", 1, model, None, {}, {"model": model.cfg.to_dict()}, tokenizer=tok)
    (d / "calib.txt").write_text(text[-60_000:-50_000])
    (d / "held.txt").write_text(text[-20_000:-15_000])
    return d


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_search_writes_a_spec_that_round_trips_and_packs_to_the_predicted_bytes(tiny, source, capsys, tmp_path):
    model = tiny[0]
    units, opts = make_units(model.cfg, "qkv"), parse_options("binary,ternary,int4,int8,fp16")
    sizes = size_table(model.cfg, units, opts)
    budget = int(1.1 * sizes[:, 1].sum())  # uniform ternary + 10%
    spec_path = tmp_path / "spec.yaml"
    rc, out, err = _run(capsys, "search", source / "ckpt", "--budget", f"{budget}B", "--units", "qkv",
                        "--calib", source / "calib.txt", "--heldout", source / "held.txt", "--calib-tokens", 2000,
                        "--ctx", 64, "--out", spec_path, "--json", "--threads", 1)
    assert rc == 0, err
    res = json.loads(out)
    dp = res["picks"]["dp"]
    assert dp["bytes"] <= budget and res["picks"]["greedy"]["bytes"] <= budget
    assert dp["measured"] > res["base_loss"] and dp["heldout"] is not None
    chosen = dp["choice"]
    assert list(chosen) == [u.name for u in units]
    spec = load_quant_spec(spec_path)
    for base in (FP, QuantConfig()):  # pack resolves against an FP model's default, finetune ternary
        ov = dict(quant_overrides_from(spec, base))
        for u in units:
            for n in u.linears:
                assert ov[n] == option(chosen[u.name]).quant, (n, base.weight)
    packed = tmp_path / "packed"
    rc, out, err = _run(capsys, "pack", source / "ckpt", packed, "--quant-spec", spec_path)
    assert rc == 0, err
    linears = set(model.cfg.linear_names())
    with safe_open(str(packed / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                     if k.rsplit(".", 1)[0] in linears)
    assert stored == dp["bytes"]
    rep = json.loads((packed / "config.json").read_text())["bytes"]
    assert rep["quantised"] + rep["scales"] + rep["fp_linears"] == dp["bytes"]


def test_pareto_and_a_short_finetune(source, capsys, tmp_path):
    rc, out, err = _run(capsys, "search", source / "ckpt", "--bpw", 3, "--units", "block", "--options",
                        "binary,ternary,int8", "--calib", source / "calib.txt", "--calib-tokens", 1000, "--ctx", 32,
                        "--sensitivity", "fisher", "--pareto", tmp_path / "pareto", "--random", 2,
                        "--finetune-steps", 3, "--finetune-out", tmp_path / "ft", "--set", "batch_size=2",
                        "--set", "block_size=32", "--json", "--threads", 1)
    assert rc == 0, err
    res = json.loads(out)
    assert res["sensitivity"] == "fisher"
    for f in ("pareto.md", "pareto.csv", "pareto.png"):
        assert (tmp_path / "pareto" / f).stat().st_size > 0
    table = (tmp_path / "pareto" / "pareto.md").read_text()
    assert "uniform ternary" in table and "searched" in table
    ft = res["finetune"]
    assert ft["steps"] == 3 and torch.isfinite(torch.tensor(ft["measured"]))
    saved = json.loads((Path(ft["checkpoint"]) / "config.json").read_text())
    assert saved["train"]["finetune"]["source"] == str(source / "ckpt")
    assert saved["train"]["finetune"]["distill_alpha"] > 0  # distilled from the source
    kinds = {n: q["weight"] for n, q in saved["model"]["quant_overrides"].items()}
    assert kinds == {n: option(k).quant.weight for u, k in res["picks"]["dp"]["choice"].items()
                     for n in [f"{u}.{p}" for p in LINEARS]}


@pytest.mark.parametrize("args, needle", [
    (["--budget", "10B"], "smaller than the smallest configuration"),
    (["--budget", "40MB", "--options", "ternary,int3"], "unknown option 'int3'"),
    (["--budget", "forty MB"], "expected a size"),
    (["--bpw", "-1"], "bits per weight"),
])
def test_bad_input_is_one_line_and_exit_2(source, capsys, args, needle):
    rc, out, err = _run(capsys, "search", source / "ckpt", *args, "--calib", source / "calib.txt")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tritlm: error:") and needle in lines[0], err
    assert "Traceback" not in err + out
