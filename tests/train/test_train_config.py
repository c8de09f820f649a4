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
        load_config(f)
