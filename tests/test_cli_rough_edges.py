"""New-user rough edges of the CLI: progress without a terminal, val loss before the first eval,
throughput of short runs, messages said once and saying what differs, models without a tokenizer,
chat surviving an unencodable character, honest --help, the F16 fallback of GGUF export, the
.1bit C header from the command line."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritlm.cli import build_parser, main
from tritlm.data.tokenizer import CharTokenizer
from tritlm.formats import checkpoint as ck
from tritlm.model.config import PRESETS, ModelConfig
from tritlm.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
# the model of tests/train/test_train_e2e.py (milliseconds a step), without --quiet
SMALL = ["--preset", "tiny", "--set", "model.dim=32", "--set", "model.ffn_dim=64", "--set", "model.n_layers=2",
         "--batch-size", "4", "--block-size", "32", "--set", "eval_batches=4", "--set", "tensorboard=false",
         "--threads", "1"]
TEXT = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:\n.,!?"


def run_cli(args, check=True):
    # stdout is a pipe here: exactly the `tritlm train ... > log` case
    r = subprocess.run([sys.executable, "-m", "tritlm", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_train_without_a_terminal_logs_progress_lines_and_no_stale_val(tmp_path):
    r = run_cli(["train", *SMALL, "--max-steps", "12", "--eval-interval", "6", "--out", str(tmp_path / "run")])
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("train: step")]
    assert len(lines) >= 12, r.stdout  # every step of a 12-step run (about 20 lines a run)
    before = [ln for ln in lines if re.match(r"train: step [1-5]/", ln)]
    assert before and all("val -" in ln for ln in before)  # no val loss yet: not nan, not a stale one
    assert "nan" not in r.stdout
    assert re.search(r"train: step 12/12 .*val \d+\.\d+ \(step 6\)", r.stdout)


def test_a_two_step_run_reports_its_throughput(tmp_path):
    r = run_cli(["train", *SMALL, "--max-steps", "2", "--quiet", "--out", str(tmp_path / "run")])
    m = re.search(r"([\d,]+) tok/s, .* MFU ([\d.]+)%", r.stdout)
    assert m, r.stdout
    assert float(m.group(1).replace(",", "")) > 0 and "MFU 0.0%" not in r.stdout


def test_a_rollback_is_reported_once(tmp_path):
    r = run_cli(["train", *SMALL, "--max-steps", "14", "--out", str(tmp_path / "run"), "--set", "ckpt_interval=10",
                 "--set", "stability.warmup_steps=5", "--set", "stability.inject_nan_at=[12]"])
    both = r.stdout + r.stderr
    assert len(re.findall(r"roll(ed)? back", both)) == 1, both


def test_resume_with_another_tokenizer_of_the_same_kind_says_what_differs(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    b.write_text("pack my box with five dozen liquor jugs!\n" * 200)
    out = str(tmp_path / "run")
    run_cli(["train", *SMALL, "--quiet", "--max-steps", "2", "--data", str(a), "--out", out])
    r = run_cli(["train", *SMALL, "--quiet", "--max-steps", "4", "--data", str(b), "--out", out, "--resume"],
                check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "fingerprint" in r.stderr and "(char, not char)" not in r.stderr, r.stderr


# ---- in-process commands on small saved models -----------------------------------------------------
def _run_folder(tmp_path, cfg: ModelConfig | None = None, tok=None) -> Path:
    tok = tok or CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    cfg = cfg or ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)
    m = Transformer(cfg).eval()
    conf = {"model": cfg.to_dict(), "tokenizer": tok.kind, "tokenizer_fingerprint": tok.fingerprint()}
    ck.save_checkpoint(tmp_path / "run" / "checkpoints", 1, m, None, {}, conf, tok)
    return tmp_path / "run"


@pytest.fixture
def hf_without_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tritlm.formats.hf import export_hf

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)).eval()
    return export_hf(m, None, tmp_path / "hf")


@pytest.mark.parametrize("cmd", ["generate", "quantize", "chat"])
def test_a_model_without_a_tokenizer_is_a_one_line_error(tmp_path, hf_without_tokenizer, cmd, capsys, monkeypatch):
    (tmp_path / "ev.txt").write_text("some held-out text\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    args = {"generate": ["generate", str(hf_without_tokenizer), "--max-tokens", "2"],
            "quantize": ["quantize", str(hf_without_tokenizer), str(tmp_path / "q.gguf"), "--eval",
                         str(tmp_path / "ev.txt")],
            "chat": ["chat", str(hf_without_tokenizer)]}[cmd]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tritlm: error:") and "\n" not in err and "no tokenizer" in err


def test_chat_goes_on_after_a_character_the_tokenizer_cannot_encode(tmp_path, capsys, monkeypatch):
    run = _run_folder(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("h\u00e9llo \u20ac\nhello\n/exit\n"))
    assert main(["chat", str(run), "--max-tokens", "4", "--seed", "0"]) == 0
    cap = capsys.readouterr()
    assert "not sent" in cap.err and "U+00E9" in cap.err
    assert cap.out.strip()  # the second message got a reply


def test_profile_help_promises_only_what_it_reads():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    text = sub.choices["profile"].format_help()
    assert "run folder /" not in text and "tritlm pack" in text


def test_export_says_which_tensors_fell_back_to_f16(tmp_path, capsys):
    pytest.importorskip("gguf")
    tiny = PRESETS["tiny"]  # the README example: dim 128, ffn 344 - no row is a whole 256-weight block
    run = _run_folder(tmp_path, tiny.replace(vocab_size=CharTokenizer.from_text(TEXT).vocab_size))
    assert main(["export", str(run), "--format", "gguf-tq2_0", str(tmp_path / "tiny.gguf")]) == 0
    out = capsys.readouterr().out
    assert f"{7 * tiny.n_layers} of {7 * tiny.n_layers} block Linears stored as F16" in out, out


def test_export_writes_the_onebit_c_header(tmp_path, capsys):
    run = _run_folder(tmp_path)
    h = tmp_path / "onebit.h"
    assert main(["export", str(run), "--format", "1bit", str(tmp_path / "m.1bit"), "--c-header", str(h)]) == 0
    assert "#ifndef TRITLM_ONEBIT_H" in h.read_text()
    assert main(["export", str(run), "--format", "1bit", str(tmp_path / "n.1bit"), "--c-header", str(h)]) == 2
    assert main(["export", str(run), "--format", "hf", str(tmp_path / "h"), "--c-header", str(tmp_path / "x.h")]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "--format 1bit" in err and not (tmp_path / "h").exists()
