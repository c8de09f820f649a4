import json

from tritlm.eval.compare import compare, equal_bytes_fp_model, wide_ternary_model
from tritlm.model.config import ModelConfig
from tritlm.model.sizes import model_sizes
from tritlm.train.config import load_config
from tritlm.train.trainer import resolve_model_config


def _cfg(tmp_path):
    return load_config(None, ["model.dim=32", "model.ffn_dim=64", "model.n_layers=1", "eval_batches=2",
                              "tensorboard=false", "eval_interval=3", "threads=1"],
                       max_steps=6, batch_size=4, block_size=16, out_dir=str(tmp_path))


def test_compare_trains_both_at_each_lr_and_picks_the_best(tmp_path):
    res = compare(_cfg(tmp_path), lrs=[1e-3, 3e-3], out_dir=tmp_path)
    assert [(r.name, r.lr) for r in res.runs] == [("ternary", 1e-3), ("ternary", 3e-3), ("fp", 1e-3), ("fp", 3e-3)]
    for name in ("ternary", "fp"):
        mine = [r for r in res.runs if r.name == name]
        assert res.best[name].result.val_loss == min(r.result.val_loss for r in mine)
    assert res.best["ternary"].result.model_config.quant.weight == "ternary"
    assert res.best["fp"].result.model_config.quant.weight == "fp"
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert len(rows) == 4 and all(len(r["val_history"]) == 2 for r in rows)
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "gap at best LRs" in (tmp_path / "compare.md").read_text()


def test_equal_bytes_fp_model_is_the_widest_that_fits(tmp_path):
    cfg = load_config(None, [], preset="tiny")
    over = equal_bytes_fp_model(cfg, 65)
    tern = resolve_model_config(cfg, 65)
    fp = ModelConfig.from_dict({**tern.to_dict(), **over, "quant": "fp"})
    budget = model_sizes(tern).packed_bytes
    assert model_sizes(fp).fp16_bytes <= budget
    d = fp.dim + 2 * fp.n_heads  # the next width the search tried, with its FFN rule
    wider = ModelConfig.from_dict({**fp.to_dict(), "dim": d, "ffn_dim": round(8 * d / 12) * 4, "quant": "fp"})
    assert model_sizes(wider).fp16_bytes > budget


def test_wide_ternary_model_is_the_widest_that_fits(tmp_path):
    cfg = load_config(None, [], preset="tiny")
    over = wide_ternary_model(cfg, 65)
    tern = resolve_model_config(cfg, 65)
    budget = model_sizes(tern.fp_twin()).fp16_bytes
    wide = ModelConfig.from_dict({**tern.to_dict(), **over})
    assert wide.quantised and wide.dim > 2 * tern.dim  # ~8x the weights at 1/8 the bits each
    assert model_sizes(wide).packed_bytes <= budget
    d = wide.dim + 2 * wide.n_heads
    wider = ModelConfig.from_dict({**wide.to_dict(), "dim": d, "ffn_dim": round(8 * d / 12) * 4})
    assert model_sizes(wider).packed_bytes > budget


def test_compare_variant_lrs(tmp_path):
    res = compare(_cfg(tmp_path), lrs=[1e-3, 3e-3], out_dir=tmp_path,
                  variants={"ternary": {"fp": False}, "fp": {"fp": True}, "ternary-wide": {"fp": False}},
                  variant_lrs={"ternary-wide": [2e-3]})
    assert [(r.name, r.lr) for r in res.runs][-1] == ("ternary-wide", 2e-3)
    assert "equal weight bytes (ternary-wide - fp)" in res.table_markdown()


def test_compare_over_seeds_reports_mean_spread_and_the_paired_gap(tmp_path):
    import re
    import statistics

    res = compare(_cfg(tmp_path), out_dir=tmp_path, seeds=[1, 2, 3])
    assert [(r.name, r.seed) for r in res.runs] == [("ternary", s) for s in (1, 2, 3)] + [("fp", s) for s in (1, 2, 3)]
    t = [r.result.val_loss for r in res.runs if r.name == "ternary"]
    f = [r.result.val_loss for r in res.runs if r.name == "fp"]
    assert len(set(t)) == 3  # the seeds really differ
    md = res.table_markdown()
    row = next(line for line in md.splitlines() if line.startswith("| ternary"))
    assert f"{statistics.mean(t):.4f} | {statistics.stdev(t):.4f}" in row
    gaps = [a - b for a, b in zip(t, f)]
    m = re.search(r"paired over 3 seeds: ([-+]\d\.\d{4}) \(std (\d\.\d{4})", md)
    assert m and float(m.group(1)) == round(statistics.mean(gaps), 4)
    assert float(m.group(2)) == round(statistics.stdev(gaps), 4)
