import os
import subprocess
import sys

import pytest
import torch

from tritlm.errors import FormatError
from tritlm.formats import checkpoint as ck
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.quant.config import FP
from tritlm.train.stability import SpikeDetector


def _model(tie=False):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=11, dim=16, n_layers=1, n_heads=2, ffn_dim=24,
                                   max_seq_len=8, quant=FP, tie_embeddings=tie))


def _step(m, opt):
    _, loss = m(torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)))
    loss.backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_model_optimizer_rng(tmp_path, tie):
    m = _model(tie)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _step(m, opt)
    torch.manual_seed(123)
    path = ck.save_checkpoint(tmp_path, 1, m, opt, {"x": 1}, {"model": m.cfg.to_dict()})
    expected_rand = torch.rand(3)
    m2 = _model(tie)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    c = ck.read_checkpoint(path)
    ck.load_model_state(m2, c["model"], "t")
    meta = c["state"]["optimizer"]
    ck.restore_optimizer(opt2, {k: v for k, v in c["optim"].items() if k.startswith("state.")}, meta)
    ck.set_rng_state({k: v for k, v in c["optim"].items() if k.startswith("rng.")})
    assert torch.equal(torch.rand(3), expected_rand)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and len(s1) > 0
    for i in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[i][name], s2[i][name])
    assert c["state"]["x"] == 1 and c["state"]["step"] == 1
    if tie:
        assert m2.lm_head.weight is m2.embed_tokens.weight


def test_latest_prune_and_stale_pointer(tmp_path):
    m = _model()
    for s in (1, 2, 3):
        ck.save_checkpoint(tmp_path, s, m, None, {}, {}, keep=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert ck.latest_checkpoint(tmp_path).name == "step-000003"
    (tmp_path / "latest.json").write_text("{garbage")
    assert ck.latest_checkpoint(tmp_path).name == "step-000003"


def test_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    code = (
        "import sys, torch\n"
        "from tests.train.test_train_checkpoint import _model\n"
        "from tritlm.formats import checkpoint as ck\n"
        "m = _model()\n"
        f"ck.save_checkpoint(__import__('pathlib').Path({str(tmp_path)!r}), 7, m, None, {{}}, {{}})\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ck.save_checkpoint(tmp_path, 3, _model(), None, {}, {})
    env = {**os.environ, "TRITLM_TEST_KILL_AT": "after-weights", "PYTHONPATH": root}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root)
    assert r.returncode == -9  # really SIGKILLed mid-save
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())
    assert ck.latest_checkpoint(tmp_path).name == "step-000003"
    ck.clean_partial(tmp_path)
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_corrupt_files_are_format_errors(tmp_path):
    path = ck.save_checkpoint(tmp_path, 1, _model(), None, {}, {})
    (path / ck.MODEL_FILE).write_bytes(b"\x00" * 20)
    with pytest.raises(FormatError, match="corrupt"):
        ck.read_checkpoint(path)
    with pytest.raises(FormatError, match="not a complete"):
        ck.read_checkpoint(tmp_path / "nothing")


def test_spike_detector():
    d = SpikeDetector(beta=0.9, sigma=6, ratio=1.5, warmup=20)
    for i in range(100):
        loss = 3.0 - 0.01 * i + 0.02 * ((-1) ** i)
        assert d.check(loss) is None
        d.update(loss)
    assert d.check(float("nan")) == "nan"
    assert d.check(float("inf")) == "nan"
    assert d.check(d.ema * 3) == "spike"
    assert d.check(d.ema * 1.05) is None
    fresh = SpikeDetector(warmup=5)
    assert fresh.check(1e6) is None  # no judgement before the EMA settles


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from tritlm.errors import DiskFullError

    ck.save_checkpoint(tmp_path, 1, _model(), None, {}, {})

    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"\x00" * 10)  # a partial file in the temporary
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) '
                              f'at path "{path}"')

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(DiskFullError, match=r"step-000002.*no space left.*free") as ei:
        ck.save_checkpoint(tmp_path, 2, _model(), None, {}, {})
    assert "\n" not in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000001"]
    assert ck.latest_checkpoint(tmp_path).name == "step-000001"
    ck.read_checkpoint(tmp_path / "step-000001")


class _Kill(BaseException):
    """Stands in for a SIGKILL at a hook: nothing after it runs (clean-up is patched out too)."""


def _kill():
    raise _Kill


def test_kill_while_pruning_leaves_a_hidden_folder_that_start_up_removes(tmp_path, monkeypatch):
    m = _model()
    for s in (1, 2):
        ck.save_checkpoint(tmp_path, s, m, None, {}, {}, keep=2)
    monkeypatch.setattr(ck, "_prune_point", _kill)
    with pytest.raises(_Kill):
        ck.save_checkpoint(tmp_path, 3, m, None, {}, {}, keep=2)
    monkeypatch.undo()
    trash = [p for p in tmp_path.iterdir() if p.name.startswith(".trash-")]
    assert [p.name for p in trash] == [f".trash-step-000001-{os.getpid()}"]
    # simulate a half-done rmtree of the renamed folder
    (trash[0] / ck.MODEL_FILE).unlink()
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    ck.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000002", "step-000003"]
    assert ck.latest_checkpoint(tmp_path).name == "step-000003"


def test_kill_while_re_saving_a_step_keeps_one_complete_copy(tmp_path, monkeypatch):
    from tritlm import io_atomic

    ck.save_checkpoint(tmp_path, 5, _model(), None, {"v": "old"}, {})
    monkeypatch.setattr(io_atomic, "_swap_point", _kill)
    monkeypatch.setattr(io_atomic, "_remove", lambda p: None)
    with pytest.raises(_Kill):
        ck.save_checkpoint(tmp_path, 5, _model(), None, {"v": "new"}, {})
    monkeypatch.undo()
    pid = os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.json", f"step-000005.old.tmp-{pid}", f"step-000005.tmp-{pid}"]  # step-000005 itself gone
    ck.clean_partial(tmp_path)  # what the next run does at start-up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000005"]
    c = ck.read_checkpoint(ck.latest_checkpoint(tmp_path))
    assert c["state"]["v"] == "old" and c["state"]["step"] == 5
    # a later re-save goes through whole
    ck.save_checkpoint(tmp_path, 5, _model(), None, {"v": "new"}, {})
    assert ck.read_checkpoint(tmp_path / "step-000005")["state"]["v"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000005"]


def test_clean_partial_never_removes_a_complete_checkpoint(tmp_path):
    ck.save_checkpoint(tmp_path, 1, _model(), None, {}, {})
    (tmp_path / "step-000002.tmp-99").mkdir()
    (tmp_path / ".trash-step-000000-99").mkdir()
    (tmp_path / "step-000001.old.tmp-99").mkdir()  # an incomplete copy, step-000001 present
    ck.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000001"]
    ck.read_checkpoint(tmp_path / "step-000001")
