"""tritlm.load reads what the exporters write; the export/inspect/validate/repair commands."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")

import tritlm  # noqa: E402
from tritlm.cli import main  # noqa: E402
from tritlm.data.tokenizer import ByteTokenizer  # noqa: E402
from tritlm.formats.common import rel_error  # noqa: E402
from tritlm.formats.gguf import export_gguf  # noqa: E402
from tritlm.formats.hf import export_hf  # noqa: E402
from tritlm.model.config import ModelConfig  # noqa: E402
from tritlm.model.transformer import Transformer  # noqa: E402
from tritlm.quant.config import TERNARY  # noqa: E402


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, dim=256, n_layers=1, n_heads=2, ffn_dim=256, max_seq_len=32, quant=TERNARY)
    return Transformer(cfg).eval()


def test_load_dispatches_and_cli_round_trip(tmp_path, model, capsys):
    g = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf")
    m = tritlm.load(g)
    assert m.source == "gguf" and m.logits([1, 2, 3]).shape == (3, 257)
    assert isinstance(m.generate("ab", max_tokens=3, seed=0), str)
    # gguf -> hf through the CLI, then load the HF folder
    assert main(["export", str(g), "--format", "hf", str(tmp_path / "hf")]) == 0
    h = tritlm.load(tmp_path / "hf")
    assert h.source == "hf"
    assert rel_error(h.logits([5, 6, 7, 8]), m.logits([5, 6, 7, 8])) < 1e-5
    assert main(["export", str(tmp_path / "hf"), "--format", "gguf-i2_s", str(tmp_path / "i.gguf")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "i.gguf")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "I2_S" in info["by_type"]
    assert main(["validate", str(tmp_path / "i.gguf")]) == 0
    assert main(["repair", str(g), str(tmp_path / "r.gguf")]) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    assert main(["validate", str(bad)]) == 1
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tritlm: error:") and "\n" not in err
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2
    export_hf_dir = tmp_path / "x"
    export_hf_dir.mkdir()
    (export_hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(tritlm.errors.FormatError, match="gpt2"):
        tritlm.load(export_hf_dir)


def test_export_hf_cli_from_hf(tmp_path, model):
    export_hf(model, ByteTokenizer(), tmp_path / "a")
    assert main(["export", str(tmp_path / "a"), "--format", "gguf-tq1_0", str(tmp_path / "b.gguf")]) == 0
    assert tritlm.load(tmp_path / "b.gguf").config == model.cfg
    assert main(["export", str(tmp_path / "b.gguf"), "--format", "1bit", str(tmp_path / "c.1bit")]) == 0
    m = tritlm.load(tmp_path / "c.1bit")
    assert m.source == "1bit" and m.config == model.cfg


def test_quantize_command(tmp_path, capsys):
    from tritlm.quant.config import FP

    torch.manual_seed(0)
    fp = Transformer(ModelConfig(vocab_size=257, dim=256, n_layers=1, n_heads=2, ffn_dim=256, max_seq_len=32,
                                 quant=FP)).eval()
    export_hf(fp, ByteTokenizer(), tmp_path / "fp")
    (tmp_path / "held.txt").write_text("some held-out text " * 20)
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "q.gguf"), "--eval", str(tmp_path / "held.txt")]) == 0
    assert "perplexity" in capsys.readouterr().out
    q = tritlm.load(tmp_path / "q.gguf")
    assert q.config.quantised and q.config.quant.weight == "ternary"
    assert main(["quantize", str(tmp_path / "fp"), str(tmp_path / "b.1bit"), "--bits", "binary"]) == 0
    assert tritlm.load(tmp_path / "b.1bit").config.quant.weight == "binary"


def test_export_and_quantize_api(tmp_path, model):
    """The library twins of `tritlm export` and `tritlm quantize`: typed arguments, results returned."""
    from tritlm.api import QuantizeResult, export_model, quantize
    from tritlm.quant.config import FP

    export_hf(model, ByteTokenizer(), tmp_path / "a")
    out = export_model(tmp_path / "a", "gguf-tq2_0", tmp_path / "a.gguf")
    assert out == tmp_path / "a.gguf" and tritlm.load(out).config == model.cfg
    with pytest.raises(tritlm.errors.FormatError, match="unknown export format"):
        export_model(tmp_path / "a", "onnx", tmp_path / "x")
    torch.manual_seed(0)
    fp = Transformer(ModelConfig(vocab_size=257, dim=256, n_layers=1, n_heads=2, ffn_dim=256, max_seq_len=32,
                                 quant=FP)).eval()
    export_hf(fp, ByteTokenizer(), tmp_path / "fp")
    (tmp_path / "held.txt").write_text("some held-out text " * 20)
    r = quantize(tmp_path / "fp", tmp_path / "q.1bit", bits="binary", eval_text=tmp_path / "held.txt")
    assert isinstance(r, QuantizeResult) and r.out == tmp_path / "q.1bit" and r.bits == "binary"
    assert r.ppl_before > 0 and r.ppl_after > 0
    assert quantize(tmp_path / "fp", tmp_path / "q2.gguf").ppl_before is None
    assert tritlm.load(tmp_path / "q.1bit").config.quant.weight == "binary"


def test_fifo_or_device_as_model_is_an_error_not_a_hang(tmp_path):
    """Issue 10: a FIFO given as MODEL was opened before checking it is a regular file (blocked)."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    for args in (["generate", str(fifo), "--prompt", "a"], ["inspect", str(fifo)], ["info", str(fifo)],
                 ["generate", "/dev/zero", "--prompt", "a"]):
        r = subprocess.run([sys.executable, "-m", "tritlm", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("tritlm: error:"), (args, r.stderr[-300:])
        assert "Traceback" not in r.stderr


def test_output_closed_early_is_not_a_traceback(tmp_path):
    """`tritlm inspect x | head`: the reader leaves early; no BrokenPipeError traceback (issue 10)."""
    import subprocess
    import sys

    from tritlm.formats.packed import random_packed, save_packed
    from tritlm.model.config import ModelConfig

    # enough tensor records that the JSON is larger than a pipe's buffer
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=128, n_heads=2, ffn_dim=128, max_seq_len=16)
    p = save_packed(random_packed(cfg), tmp_path / "m")
    proc = subprocess.Popen([sys.executable, "-m", "tritlm", "inspect", str(p), "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
