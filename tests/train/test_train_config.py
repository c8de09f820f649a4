import pytest

from tritlm.errors import ConfigError
from tritlm.train.config import load_config


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny\noptim:\n  lr: 0.002\n  schedule: two-stage\nmodel:\n  dim: 64\n")
    c = load_config(p, ["optim.lr=3e-3", "stability.inject_nan_at=[4]"], max_steps=7)
    assert c.optim.lr == 3e-3 and c.optim.schedule == "two-stage"
    assert c.model == {"dim": 64} and c.stability.inject_nan_at == [4] and c.max_steps == 7


@pytest.mark.parametrize("over,msg", [
    (["optim.lrr=1"], "unknown config key.*optim.lrr"),
    (["max_steps=ten"], "max_steps"),
    (["noequals"], "key=value"),
    (["kernel=cuda"], "kernel.*auto, torch, triton"),
    (["fsdp=maybe"], "fsdp"),
])
def test_bad_keys_are_clear(over, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, over)


def test_missing_or_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_example_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files, "the repo ships example configs"
    for f in files:
        # a fine-tuning recipe is used by `tritlm finetune SRC`, which supplies the source
        load_config(f, **({"finetune.source": "src"} if f.name.startswith("finetune") else {}))


@pytest.mark.parametrize("over,key", [
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.lr=0", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"),
    ("eval_interval=0", "eval_interval"), ("ckpt_interval=-5", "ckpt_interval"),
    ("log_interval=0", "log_interval"), ("grad_accum=0", "grad_accum"), ("max_steps=0", "max_steps"),
    ("max_steps=.inf", "max_steps"), ("batch_size=0", "batch_size"), ("block_size=-1", "block_size"),
    ("eval_batches=0", "eval_batches"), ("threads=0", "threads"), ("keep_checkpoints=-1", "keep_checkpoints"),
    ("label_smoothing=1", "label_smoothing"), ("data.val_fraction=0", "data.val_fraction"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.grad_clip=.nan", "optim.grad_clip"), ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.beta1=1", "optim.beta1"), ("optim.beta2=-0.1", "optim.beta2"), ("optim.eps=0", "optim.eps"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"), ("optim.two_stage_split=1.5", "optim.two_stage_split"),
    ("quant_schedule.alpha0=0", "quant_schedule.alpha0"),
    ("quant_schedule.anneal_steps=-1", "quant_schedule.anneal_steps"),
    ("stability.ema_beta=1", "stability.ema_beta"), ("stability.lr_backoff=0", "stability.lr_backoff"),
    ("stability.max_rollbacks=-1", "stability.max_rollbacks"),
    ("stability.inject_nan_at=[-3]", r"stability.inject_nan_at\[0\]"),
])
def test_bad_numbers_name_the_key(over, key):
    with pytest.raises(ConfigError, match=f"config key {key}:") as e:
        load_config(None, [over])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over,key,allowed", [
    ("optim.schedule=warmup-cosine", "optim.schedule", "constant, linear, cosine, two-stage"),
    ("optim.wd_schedule=cosine", "optim.wd_schedule", "constant, two-stage"),
    ("dtype=fp16", "dtype", "auto, float32, bfloat16"),
    ("device=tpu", "device", "auto, cpu, cuda"),
    ("preset=huge", "preset", "tiny"),
])
def test_unknown_strings_list_the_choices(over, key, allowed):
    with pytest.raises(ConfigError, match=f"config key {key}: unknown value.*{allowed}"):
        load_config(None, [over])


def test_bad_values_from_yaml_and_direct(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(p)
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, batch_size=0)
    from tritlm.train.config import config_from_dict

    with pytest.raises(ConfigError, match="optim.schedule"):
        config_from_dict({"optim": {"schedule": "nope"}})


def test_defaults_and_edges_are_accepted():
    c = load_config(None, ["optim.grad_clip=0", "keep_checkpoints=0", "optim.warmup_steps=0",
                           "eval_batches=null", "threads=null", "optim.weight_decay=0"])
    assert c.optim.grad_clip == 0 and c.keep_checkpoints == 0


def test_warmup_longer_than_run_is_a_logged_warning(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="tritlm.train.config"):
        load_config(None, ["optim.warmup_steps=500"], max_steps=20)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("500" in m and "20" in m and "warmup" in m for m in msgs), msgs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tritlm.train.config"):
        load_config(None, ["optim.warmup_steps=10"], max_steps=20)
    assert not caplog.records
