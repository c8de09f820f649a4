"""Units, options, budgets and the real packed bytes of each option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tritlm.errors import ConfigError
from tritlm.model.config import ModelConfig
from tritlm.nn.packed_linear import pack_levels
from tritlm.search.budget import budget_from_bpw, parse_budget
from tritlm.search.units import (
    DEFAULT_OPTIONS,
    make_units,
    option,
    packed_linear_bytes,
    parse_options,
    size_table,
)

KINDS = list(DEFAULT_OPTIONS) + ["ternary-ch", "binary-ch", "int4-g32", "int4-g128"]


def _levels(kind: str, n: int, k: int, rng) -> np.ndarray:
    top = {"ternary": 1, "binary": 1, "int8": 127, "int4": 7}[kind]
    lv = rng.integers(-top, top + 1, size=(n, k)).astype(np.int8)
    return np.where(lv == 0, 1, lv).astype(np.int8) if kind == "binary" else lv


@pytest.mark.parametrize("name", KINDS)
def test_packed_bytes_equal_what_the_packer_stores(name):
    """Against the packers themselves, on shapes that need every kind of padding."""
    rng = np.random.default_rng(0)
    q = option(name).quant
    for n, k in [(1, 1), (3, 5), (4, 128), (7, 129), (64, 688), (33, 300), (256, 256)]:
        if not q.quantised:
            want = torch.zeros(n, k, dtype=torch.float16).numel() * 2
        else:
            groups = -(-k // q.group_size)
            scale = np.ones((n, groups) if q.weight == "int4" else (n,) if q.per_channel else (1,), np.float32)
            pl = pack_levels(_levels(q.weight, n, k, rng), scale, q)
            want = pl.nbytes
            assert want == pl.weights.data.nbytes + scale.nbytes
        assert packed_linear_bytes(n, k, q) == want, (name, n, k)
    tq = option("ternary").quant
    pl = pack_levels(_levels("ternary", 9, 301, rng), np.ones(1, np.float32), tq, ternary_layout="base3")
    assert packed_linear_bytes(9, 301, tq, ternary_layout="base3") == pl.nbytes


def test_units_partition_the_block_linears():
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=2, ffn_dim=64)
    names = cfg.linear_names()
    for mode, count in (("linear", 21), ("qkv", 12), ("block", 3)):
        units = make_units(cfg, mode)
        assert len(units) == count
        flat = [n for u in units for n in u.linears]
        assert flat == names  # every Linear once, in model order
    qkv = make_units(cfg, "qkv")[0]
    assert qkv.linears == tuple(f"layers.0.self_attn.{p}_proj" for p in "qkv")
    with pytest.raises(ConfigError):
        make_units(cfg, "heads")


def test_size_table_sums_the_units_layers():
    cfg = ModelConfig(vocab_size=50, dim=64, n_layers=1, n_heads=2, ffn_dim=128)
    units, opts = make_units(cfg, "qkv"), parse_options("binary,ternary,int4,int8,fp16")
    t = size_table(cfg, units, opts)
    # gate_up: two [128, 64] Linears; int8 is 64 bytes a row + a 4-byte scale per row
    assert t[2, 3] == 2 * (128 * 64 + 4 * 128)
    assert t[0, 4] == 3 * 64 * 64 * 2  # fp16 q, k, v


def test_options_and_budgets_parse_or_fail_in_one_line():
    assert [o.name for o in parse_options("binary, int8,fp16")] == ["binary", "int8", "fp16"]
    assert option("int4-g32").quant.group_size == 32 and option("ternary-ch").quant.scale == "channel"
    for bad in ("int3", "ternary,ternary", "", "int4-g48"):
        with pytest.raises(ConfigError):
            parse_options(bad)
    assert parse_budget("40MB") == 40_000_000 and parse_budget("2MiB") == 2 * 2**20
    assert parse_budget("1.5kb") == 1500 and parse_budget("1234") == 1234 and parse_budget("7 B") == 7
    for bad in ("forty", "40XB", "-3MB", "0", "MB", "1e400MB"):
        with pytest.raises(ConfigError):
            parse_budget(bad)
    assert budget_from_bpw(2.0, 1000) == 250
    with pytest.raises(ConfigError):
        budget_from_bpw(0.0, 1000)
