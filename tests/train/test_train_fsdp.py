"""FSDP2 training on the CPU: 2 processes with gloo under torchrun, through the real CLI.

The FSDP losses equal a single process's on the same global batch, a run killed mid-save resumes
from its sharded checkpoint bitwise, and the sharded checkpoint converts to a single-folder one
holding the FSDP model's weights.
"""

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritlm.data import TokenData

ROOT = Path(__file__).resolve().parents[2]
# A tiny model (steps of milliseconds) at a real LR from the first step (no warmup): these tests are
# about the sharding, and 5 steps of near-zero updates would hide a wrong gradient.
SMALL = ["--preset", "tiny", "--set", "model.dim=32", "--set", "model.ffn_dim=64", "--set", "model.n_layers=2",
         "--block-size", "32", "--set", "eval_batches=4", "--set", "log_interval=1", "--set", "tensorboard=false",
         "--set", "optim.warmup_steps=0", "--set", "dtype=float32", "--threads", "1", "--quiet"]
PER_RANK_BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, env=None, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "tritlm", "train", *args, "--fsdp", "--batch-size", str(PER_RANK_BATCH)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_cli(args, check=True):
    r = subprocess.run([sys.executable, "-m", "tritlm", *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_losses(out: Path) -> dict[int, str]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f) if r["split"] == "train" and not r["event"]}


def val_losses(out: Path) -> dict[int, float]:
    with open(out / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "val"}


@pytest.mark.parametrize("tied,accum,nan_at", [(False, 1, "[1,4]"), (True, 2, "[]")])
def test_fsdp_losses_equal_a_single_process_on_the_same_global_batch(tmp_path, monkeypatch, tied, accum, nan_at):
    """Each rank draws its own windows (rank, world_size are in the data seed); the single-process
    reference trains on both ranks' windows concatenated, so the global batch is the same. The
    losses agree to an ulp or so (4.8e-7 at a loss of 4): the two sum the gradient in another
    order, so bitwise equality is not to be had. ``accum`` 2 covers FSDP's no_sync (gradients
    reduced on the last micro-batch only); the injected NaNs, rollbacks to the sharded checkpoints
    of step 0 (no optimizer state yet) and step 3."""
    from tritlm.train.config import load_config
    from tritlm.train.trainer import Trainer

    args = [*SMALL, "--max-steps", "5", "--set", "ckpt_interval=3", "--set", "eval_interval=5",
            "--set", f"model.tie_embeddings={str(tied).lower()}", "--set", f"grad_accum={accum}",
            "--set", f"stability.inject_nan_at={nan_at}"]
    torchrun([*args, "--out", str(tmp_path / "fsdp")])

    one_rank = TokenData.get_batch

    def both_ranks(self, split, step, batch_size, block_size, seed, rank=0, world_size=1, micro=0):
        assert (rank, world_size) == (0, 1)
        xs, ys = zip(*(one_rank(self, split, step, batch_size // 2, block_size, seed, rank=r, world_size=2,
                                micro=micro) for r in range(2)))
        return torch.cat(xs), torch.cat(ys)

    monkeypatch.setattr(TokenData, "get_batch", both_ranks)
    overrides = [a for flag, a in zip(args, args[1:]) if flag == "--set"]
    cfg = load_config(None, overrides, preset="tiny", block_size=32, threads=1, max_steps=5,
                      batch_size=2 * PER_RANK_BATCH, out_dir=str(tmp_path / "single"))
    Trainer(cfg).run()

    a, b = train_losses(tmp_path / "fsdp"), train_losses(tmp_path / "single")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    diffs = [abs(float(a[k]) - float(b[k])) for k in a]
    assert max(diffs) < 1e-6, diffs
    assert float(a[5]) < float(a[1])  # it trains: the comparison is not between two frozen models
    with open(tmp_path / "fsdp" / "metrics.csv") as f:
        events = [row["event"] for row in csv.DictReader(f) if row["event"]]
    assert events == (["nan: rollback to 0", "nan: rollback to 3"] if nan_at != "[]" else [])


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """An uninterrupted FSDP run (tied embeddings), and one SIGKILLed while writing its step-6
    checkpoint (step 3's written) and resumed with --resume."""
    tmp = tmp_path_factory.mktemp("fsdp")
    args = [*SMALL, "--max-steps", "9", "--set", "ckpt_interval=3", "--set", "eval_interval=3",
            "--set", "model.tie_embeddings=true"]
    ref, cut = tmp / "ref", tmp / "cut"
    torchrun([*args, "--out", str(ref)])
    r = torchrun([*args, "--out", str(cut)], env={"TRITLM_TEST_KILL_AT": "after-weights:6"}, check=False)
    killed = r.returncode, sorted(p.name for p in (cut / "checkpoints").iterdir())
    torchrun([*args, "--out", str(cut), "--resume"])
    return ref, cut, killed


def test_fsdp_resume_after_sigkill_mid_save_is_bitwise_identical(fsdp_runs):
    from tritlm.formats.sharded import full_model_state

    ref, cut, (rc, left) = fsdp_runs
    assert rc != 0  # torchrun reports the rank killed by SIGKILL as a failure
    assert "step-000003" in left and "step-000006" not in left  # the kill lost nothing but the save
    assert any(".tmp-" in name for name in left)
    a, b = train_losses(ref), train_losses(cut)
    assert sorted(a) == list(range(1, 10)) and a == b  # every step, compared as printed strings
    assert val_losses(ref) == val_losses(cut)
    wa, _ = full_model_state(ref / "checkpoints" / "step-000009")
    wb, _ = full_model_state(cut / "checkpoints" / "step-000009")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(".tmp-" in p.name for p in (cut / "checkpoints").iterdir())


# Loads a sharded checkpoint into a freshly built FSDP model (2 ranks) and has rank 0 save the
# model's full state dict, gathered by torch: the weights as the FSDP model holds them.
FULL_STATE = """
import sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tritlm.formats.sharded import load_sharded
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.safe_json import read_json
from tritlm.train.config import TrainConfig
from tritlm.train.distributed import init_distributed
from tritlm.train.parallelize import data_parallel_mesh, parallelize
src, out = sys.argv[1:]
info = init_distributed("cpu")
model = Transformer(ModelConfig.from_dict(read_json(src + "/config.json")["model"]))
parallelize(model, data_parallel_mesh(info), TrainConfig())
load_sharded(src, model, None, info.rank)
full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if info.rank == 0:
    torch.save(full, out)
dist.barrier()
"""


def test_sharded_checkpoint_converts_to_a_single_folder_one_that_loads_and_generates(fsdp_runs, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import tritlm

    ref = fsdp_runs[0]
    src = ref / "checkpoints" / "step-000009"
    r = run_cli(["generate", str(ref), "--max-tokens", "5"], check=False)
    assert r.returncode == 2 and "checkpoint-convert" in r.stderr and "Traceback" not in r.stderr

    dst = tmp_path / "single"
    run_cli(["checkpoint-convert", str(ref), str(dst)])  # a run folder: its latest checkpoint
    assert (dst / "model.safetensors").is_file() and not (dst / "dcp").exists()
    ours = load_file(str(dst / "model.safetensors"))
    # torch's own DCP -> torch.save conversion, an independent reading of the FSDP model's shards
    dcp_to_torch_save(src / "dcp", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    assert set(full) == set(ours) | {"lm_head.weight"}  # the tied head is stored once
    assert all(torch.equal(ours[k], full[k]) for k in ours)
    assert torch.equal(full["lm_head.weight"], ours["embed_tokens.weight"])
    script = tmp_path / "full_state.py"
    script.write_text(FULL_STATE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(script), str(src), str(tmp_path / "fsdp.pt")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stderr[-3000:]
    gathered = torch.load(tmp_path / "fsdp.pt")
    assert set(gathered) == set(full) and all(torch.equal(ours[k], gathered[k]) for k in ours)

    # the FSDP model's last validation loss, recomputed by one process from the converted weights
    m = tritlm.load(dst)
    data = TokenData(ref / "data")
    tot = n = 0.0
    with torch.no_grad():
        for i, (x, y) in enumerate(data.eval_batches("val", 32, 32)):
            if i >= 8:  # eval_batches=4 per process, 2 processes
                break
            _, loss = m.model(x, y)
            tot, n = tot + loss.item() * y.numel(), n + y.numel()
    assert abs(tot / n - val_losses(ref)[9]) < 1e-6

    g = run_cli(["generate", str(dst), "--prompt", "ROMEO:", "--max-tokens", "12", "--seed", "1"])
    assert g.stdout.startswith("ROMEO:") and len(g.stdout.rstrip("\n")) > len("ROMEO:")
    r = run_cli(["checkpoint-convert", str(ref), str(dst)], check=False)
    assert r.returncode == 2 and "exists" in r.stderr


def _one_line_error(r, *words):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and all(w in lines[0] for w in words), r.stderr


def test_a_truncated_shard_is_a_one_line_error(fsdp_runs, tmp_path):
    src = tmp_path / "step-000009"
    shutil.copytree(fsdp_runs[0] / "checkpoints" / "step-000009", src)
    shard = src / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    _one_line_error(run_cli(["checkpoint-convert", str(src), str(tmp_path / "out")], check=False),
                    "cannot read the sharded checkpoint")
    assert not (tmp_path / "out").exists()


def test_fsdp_in_a_single_process_warns_and_trains_unsharded(tmp_path):
    out = tmp_path / "one"
    r = run_cli(["train", *SMALL, "--batch-size", "4", "--max-steps", "2", "--out", str(out), "--fsdp"])
    assert "nothing to shard" in " ".join((r.stdout + r.stderr).split())
    assert (out / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    _one_line_error(run_cli(["checkpoint-convert", str(out), str(tmp_path / "c")], check=False),
                    "not a sharded", "single-folder")


def test_lockstep_evaluation_counts_each_batch_once_and_runs_as_many_forwards_on_every_rank(tmp_path, monkeypatch):
    """Under FSDP every forward is a collective: the evaluation of each of 3 (simulated) ranks runs
    the same number of forwards, and their sums together are the single-process evaluation's."""
    from tritlm.data import prepare_dataset
    from tritlm.model.config import ModelConfig, preset
    from tritlm.model.transformer import Transformer
    from tritlm.train import trainer as tr_mod
    from tritlm.train.config import load_config
    from tritlm.train.distributed import DistInfo

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}: to be, or not to be\n" for i in range(400)))
    prepare_dataset(corpus, tmp_path / "data", tokenizer="char", val_fraction=0.1)
    data = TokenData(tmp_path / "data")
    n_batches = len(list(data.eval_batches("val", 32, 16)))
    assert n_batches % 3 != 0  # the last round leaves a rank without a batch
    torch.manual_seed(0)
    mcfg = ModelConfig.from_dict({**preset("tiny").to_dict(), "dim": 32, "ffn_dim": 64, "n_layers": 1,
                                  "vocab_size": data.vocab_size})
    model = Transformer(mcfg)
    t = tr_mod.Trainer(load_config(None, [], block_size=16, batch_size=4, out_dir=str(tmp_path / "o")))
    want = t.evaluate(model, data, DistInfo())

    sums, calls, forwards = [], [], []
    monkeypatch.setattr(tr_mod, "all_reduce_sum", lambda tot, dist: sums.append(tot) or tot)
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    t._fsdp = True
    for rank in range(3):
        calls.clear()
        t.evaluate(model, data, DistInfo(rank=rank, world_size=3))
        forwards.append(len(calls))
    assert forwards == [-(-n_batches // 3)] * 3
    tot = sum(sums)
    assert abs(float(tot[0] / tot[1]) - want) < 1e-9


@pytest.mark.slow
def test_fsdp_resume_after_a_kill_of_every_process_at_a_random_moment(tmp_path):
    """SIGKILL to torchrun and both ranks at once, wherever they are (a step, a save, an all-gather)."""
    args = [*SMALL, "--max-steps", "30", "--set", "ckpt_interval=4", "--set", "eval_interval=10"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    torchrun([*args, "--out", str(ref)])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "tritlm", "train", *args, "--fsdp", "--batch-size", str(PER_RANK_BATCH), "--out", str(cut)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (cut / "metrics.csv").exists() and max(train_losses(cut) or [0]) >= 13:
            break
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert max(train_losses(cut)) < 30  # it was killed before the end
    torchrun([*args, "--out", str(cut), "--resume"])
    assert train_losses(ref) == train_losses(cut)
