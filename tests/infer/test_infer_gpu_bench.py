"""benchmarks/bench_gpu.py keeps working on a machine without a GPU: --smoke runs each section on
tiny shapes (CPU tensors in Triton's interpreter) and writes its JSON. It measures nothing here."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_smoke_runs_every_section(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "gpu.json"
    assert mod.main(["--smoke", "--models", "700M", "--train-presets", "125M", "--json-out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["kernels"]) == 6 and all(r["ternary_us"] > 0 and r["bf16_us"] > 0 for r in doc["kernels"])
    assert [r["runtime"] for r in doc["decode"]] == ["ternary triton (graphs)", "ternary triton (eager)",
                                                      "dense bf16 (graphs)"]
    assert all(r["decode_tok_s"] > 0 for r in doc["decode"])
    assert any(r["what"].startswith("nn.Linear bf16") for r in doc["train"])
    assert any(r["what"].startswith("125M fp step") and r["tok_s"] > 0 for r in doc["train"])
