"""Every bad command-line value is one line on stderr (`tritlm: error: ...`), exit 2, no traceback.

Each case runs ``python -m tritlm`` in its own process (a few at a time: most import torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tritlm

SRC = str(Path(tritlm.__file__).resolve().parents[1])

# (id, argv after `tritlm`, text the error line must hold). {tmp}: a scratch folder, {exists}: a
# file that exists there. Model paths need not exist: flags are checked before a model loads.
CASES = [
    ("train-lr-nan", ["train", "--set", "optim.lr=.nan"], "optim.lr"),
    ("train-lr-flag-zero", ["train", "--lr", "0"], "optim.lr"),
    ("train-max-steps-0", ["train", "--max-steps", "0"], "max_steps"),
    ("train-eval-interval-0", ["train", "--eval-interval", "0"], "eval_interval"),
    ("train-batch-size-0", ["train", "--batch-size", "0"], "batch_size"),
    ("train-schedule", ["train", "--set", "optim.schedule=warmup"], "constant, linear, cosine, two-stage"),
    ("train-dtype", ["train", "--set", "dtype=fp16"], "auto, float32, bfloat16"),
    ("generate-max-tokens-0", ["generate", "nomodel", "--max-tokens", "0"], "--max-tokens"),
    ("generate-max-tokens-neg", ["generate", "nomodel", "--max-tokens", "-5"], "--max-tokens"),
    ("generate-temperature", ["generate", "nomodel", "--temperature", "-1"], "--temperature -1.0 must be"),
    ("generate-top-p", ["generate", "nomodel", "--top-p", "1.5"], "--top-p"),
    ("generate-top-k", ["generate", "nomodel", "--top-k", "-1"], "--top-k"),
    ("generate-min-p", ["generate", "nomodel", "--min-p", "2"], "--min-p"),
    ("generate-rep-penalty", ["generate", "nomodel", "--repetition-penalty", "0"], "--repetition-penalty"),
    ("generate-logit-bias", ["generate", "nomodel", "--logit-bias", "x=1"], "--logit-bias 'x=1'"),
    ("generate-typical-p", ["generate", "nomodel", "--typical-p", "0"], "--typical-p"),
    ("generate-ban-token", ["generate", "nomodel", "--ban-token", "-3"], "--ban-token"),
    ("chat-frequency-nan", ["chat", "nomodel", "--frequency-penalty", "nan"], "--frequency-penalty"),
    ("chat-max-tokens-0", ["chat", "nomodel", "--max-tokens", "0"], "--max-tokens"),
    ("chat-top-p", ["chat", "nomodel", "--top-p", "0"], "--top-p"),
    ("demo-steps-0", ["demo", "--steps", "0", "--out", "{tmp}/demo"], "--steps"),
    ("compare-lrs-text", ["compare", "--lrs", "1e-3,fast", "--out", "{tmp}/cmp"], "not a list of numbers"),
    ("compare-lrs-neg", ["compare", "--lrs", "1e-3,-1", "--out", "{tmp}/cmp"], "> 0"),
    ("serve-port-high", ["serve", "nomodel", "--port", "70000"], "--port"),
    ("serve-port-neg", ["serve", "nomodel", "--port", "-1"], "--port"),
    ("serve-max-batch-0", ["serve", "nomodel", "--max-batch", "0"], "--max-batch"),
    ("serve-kv-len-0", ["serve", "nomodel", "--kv-len", "0"], "--kv-len"),
    ("serve-max-queue-neg", ["serve", "nomodel", "--max-queue", "-1"], "--max-queue"),
    ("serve-threads-0", ["serve", "nomodel", "--threads", "0"], "--threads"),
    ("serve-max-tokens-limit-0", ["serve", "nomodel", "--max-tokens-limit", "0"], "--max-tokens-limit"),
    ("bench-threads-text", ["bench", "--threads", "1,two"], "--threads"),
    ("bench-threads-0", ["bench", "--threads", "0"], "--threads"),
    ("bench-decode-0", ["bench", "--decode-tokens", "0"], "--decode-tokens"),
    ("profile-threads-0", ["profile", "--threads", "0"], "--threads"),
    ("export-exists", ["export", "nomodel", "--format", "hf", "{exists}"], "--force"),
    ("pack-exists", ["pack", "nomodel", "{exists}"], "--force"),
]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "tritlm", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-params")
    (tmp / "exists").mkdir()
    runs = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        # a valid config with a warmup longer than the run: warned (log, on stdout), then the run
        # fails on its missing corpus
        warm = ["train", "--data", str(tmp / "no-corpus.txt"), "--max-steps", "5", "--set",
                "optim.warmup_steps=40", "--out", str(tmp / "run"), "--quiet"]
        runs["warmup-warning"] = pool.submit(_run, warm, tmp)
        for cid, argv, _ in CASES:
            argv = [x.format(tmp=tmp, exists=tmp / "exists") for x in argv]
            runs[cid] = pool.submit(_run, argv, tmp)
        return {cid: f.result() for cid, f in runs.items()}


@pytest.mark.parametrize("cid,want", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_is_one_line_exit_2(results, cid, want):
    r = results[cid]
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("tritlm: error:"), r.stderr
    assert want in lines[0], lines[0]


def test_warmup_longer_than_run_is_warned(results):
    r = results["warmup-warning"]
    assert r.returncode == 2 and "no-corpus.txt" in r.stderr and "Traceback" not in r.stderr
    out = " ".join(r.stdout.split())
    assert "WARNING" in out and "warmup_steps 40" in out and "max_steps 5" in out, r.stdout


def test_version(tmp_path):
    r = _run(["--version"], tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"tritlm {tritlm.__version__}"


def test_export_refuses_then_force_replaces(tmp_path, capsys):
    import torch

    from tritlm.api import export_model
    from tritlm.cli import main
    from tritlm.data.tokenizer import ByteTokenizer
    from tritlm.errors import FormatError
    from tritlm.formats.hf import export_hf
    from tritlm.model.config import ModelConfig
    from tritlm.model.transformer import Transformer
    from tritlm.quant.config import TERNARY

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, dim=64, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16, quant=TERNARY)
    export_hf(Transformer(cfg).eval(), ByteTokenizer(), tmp_path / "src")
    out = tmp_path / "m.1bit"
    out.write_bytes(b"old")
    with pytest.raises(FormatError, match="overwrite=True"):
        export_model(tmp_path / "src", "1bit", out)
    assert main(["export", str(tmp_path / "src"), "--format", "1bit", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert main(["export", str(tmp_path / "src"), "--format", "1bit", str(out), "--force"]) == 0
    assert out.stat().st_size > 3
    assert tritlm.load(out).config.dim == 64
