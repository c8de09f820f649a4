"""End-to-end training through the real CLI: smoke run, exact resume after SIGKILL, rollback, DDP."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# A model small enough that a step takes milliseconds: these tests are about the loop, not quality.
SMALL = ["--preset", "tiny", "--set", "model.dim=32", "--set", "model.ffn_dim=64", "--set", "model.n_layers=2",
         "--batch-size", "4", "--block-size", "32", "--set", "eval_batches=4", "--set", "log_interval=1",
         "--set", "tensorboard=false", "--threads", "1", "--quiet"]


def run_cli(args, env=None, check=True, timeout=600):
    e = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, "-m", "tritlm", *args], capture_output=True, text=True,
                       env=e, cwd=ROOT, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def train_losses(out: Path) -> dict[int, str]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f) if r["split"] == "train" and not r["event"]}


def test_smoke_train_then_generate_and_load(tmp_path):
    out = tmp_path / "run"
    r = run_cli(["train", "--preset", "tiny", "--max-steps", "40", "--out", str(out), "--quiet",
                 "--set", "eval_batches=8", "--threads", "1"])
    assert "val loss" in r.stdout
    losses = train_losses(out)
    assert float(losses[40]) < float(losses[10])
    g = run_cli(["generate", str(out), "--prompt", "ROMEO:", "--max-tokens", "20", "--seed", "3"])
    assert g.stdout.startswith("ROMEO:") and len(g.stdout) > 20
    greedy = ["generate", str(out), "--prompt", "ROMEO:", "--max-tokens", "30", "--temperature", "0"]
    full = run_cli(greedy).stdout.rstrip("\n")[len("ROMEO:"):]
    stop = full[10:12]
    cut = run_cli([*greedy, "--stop", stop]).stdout.rstrip("\n")[len("ROMEO:"):]
    assert cut == full[:full.find(stop)]

    import tritlm

    m = tritlm.load(out)
    ids = m.tokenizer.encode("To be, or not")
    lg = m.logits(ids)
    assert lg.shape == (len(ids), m.tokenizer.vocab_size) and str(lg.dtype) == "torch.float32"
    a = m.generate("To be", max_tokens=15, temperature=0.8, seed=11)
    assert a == m.generate("To be", max_tokens=15, temperature=0.8, seed=11)
    assert len(a) > 0


def test_resume_after_sigkill_mid_save_is_bitwise_identical(tmp_path):
    common = SMALL + ["--max-steps", "30", "--set", "ckpt_interval=10", "--set", "eval_interval=10"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli(["train", *common, "--out", str(ref)])
    r = run_cli(["train", *common, "--out", str(cut)], env={"TRITLM_TEST_KILL_AT": "after-weights:20"},
                check=False)
    assert r.returncode == -signal.SIGKILL
    assert any(".tmp-" in p.name for p in (cut / "checkpoints").iterdir())
    run_cli(["train", *common, "--out", str(cut), "--resume"])
    a, b = train_losses(ref), train_losses(cut)
    assert sorted(a) == list(range(1, 31)) and a == b  # every step, compared as printed strings


def test_resume_after_kill_at_a_random_moment(tmp_path):
    common = SMALL + ["--max-steps", "60", "--set", "ckpt_interval=7", "--set", "eval_interval=20"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli(["train", *common, "--out", str(ref)])
    p = subprocess.Popen([sys.executable, "-m", "tritlm", "train", *common, "--out", str(cut)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (cut / "metrics.csv").exists() and max(train_losses(cut) or [0]) >= 25:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    run_cli(["train", *common, "--out", str(cut), "--resume"])
    assert train_losses(ref) == train_losses(cut)


def test_nan_and_spike_are_rolled_back_and_run_completes(tmp_path):
    out = tmp_path / "run"
    r = run_cli(["train", *SMALL, "--max-steps", "40", "--out", str(out), "--set", "ckpt_interval=10",
                 "--set", "stability.warmup_steps=5", "--set", "stability.inject_nan_at=[12]",
                 "--set", "stability.inject_spike_at=[27]"])
    assert "rollbacks" in r.stdout
    with open(out / "metrics.csv") as f:
        events = [row["event"] for row in csv.DictReader(f) if row["event"]]
    assert events == ["nan: rollback to 10", "spike: rollback to 20"]
    losses = train_losses(out)
    assert max(losses) == 40 and all(float(v) == float(v) for v in losses.values())


def test_two_process_ddp_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "tritlm", "train", *SMALL, "--max-steps", "12", "--out", str(out), "--set", "ckpt_interval=6"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("training summary") == 1  # rank 0 reports, rank 1 stays quiet
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == [
        "step-000006", "step-000012"]
    assert len(train_losses(out)) == 12


@pytest.mark.parametrize("args,msg", [
    (["train", "--data", "/no/such/corpus.txt", "--max-steps", "1"], "no/such/corpus.txt"),
    (["train", "--set", "optim.lrr=1", "--max-steps", "1"], "unknown config key"),
    (["train", "--config", "/no/such.yaml"], "config file not found"),
    (["generate", "/no/such/model"], "no such file"),
    (["info", "--preset", "9B"], "unknown preset"),
    (["compare", "--variant-lrs", "fp-wide=1e-3"], "expected NAME=LR"),
    (["compare", "--variant-lrs", "fp=1e-3,fast"], "not a list of numbers"),
])
def test_user_errors_are_one_line(tmp_path, args, msg):
    r = run_cli([*args] + (["--out", str(tmp_path / "o")] if args[0] in ("train", "compare") else []), check=False)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr


def test_wrong_tokenizer_for_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    run_cli(["train", *SMALL, "--max-steps", "3", "--out", str(out)])
    r = run_cli(["train", *SMALL, "--max-steps", "6", "--out", str(out), "--resume", "--tokenizer", "byte"],
                check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tokenizer" in r.stderr


def test_bf16_autocast_training_runs_and_learns(tmp_path):
    """dtype=bfloat16 forces the autocast path (the GPU default) on CPU: finite, falling losses,
    float32 master weights in the checkpoint, val loss close to a float32 run of the same seed."""
    from safetensors.torch import load_file

    losses, vals = {}, {}
    for dt in ("bfloat16", "float32"):
        out = tmp_path / dt
        r = run_cli(["train", *SMALL, "--max-steps", "30", "--out", str(out), "--set", f"dtype={dt}"])
        assert "val loss" in r.stdout
        losses[dt] = {k: float(v) for k, v in train_losses(out).items()}
        with open(out / "metrics.csv") as f:
            vals[dt] = [float(row["loss"]) for row in csv.DictReader(f) if row["split"] == "val"][-1]
    lb = losses["bfloat16"]
    assert all(math.isfinite(v) for v in lb.values()) and lb[30] < lb[1]
    w = load_file(str(tmp_path / "bfloat16" / "checkpoints" / "step-000030" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in w.values())
    assert abs(vals["bfloat16"] - vals["float32"]) < 0.1


def test_a_second_run_into_the_same_out_refuses_and_a_stale_lock_is_taken_over(tmp_path):
    """A live run's lock (here a process holding it through the library) makes a second `train`
    into the same --out refuse in one line naming the pid; once that pid is dead, its stale lock is
    taken over with a warning, and the lock is released when the run ends."""
    out = tmp_path / "run"
    code = ("import time\nfrom tritlm.io_atomic import run_lock\n"
            f"with run_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run_cli(["train", *SMALL, "--max-steps", "2", "--out", str(out)], check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0], r.stderr
        assert not (out / "checkpoints").exists()  # it touched nothing
    finally:
        holder.kill()
        holder.wait()
    r = run_cli(["train", *SMALL, "--max-steps", "2", "--out", str(out)], check=False)
    assert r.returncode == 0, r.stderr
    said = " ".join((r.stdout + r.stderr).split())  # the warning goes through rich (wrapped lines)
    assert "stale lock" in said and f"pid {holder.pid}" in said, said
    assert not (out / ".tritlm.lock").exists()
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file()
