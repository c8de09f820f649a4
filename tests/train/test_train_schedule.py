import math

import pytest

from tritlm.train.schedule import QuantSchedule, lr_at, quant_state_at, wd_at


def test_warmup_then_cosine_to_min():
    kw = dict(lr=1e-3, max_steps=1000, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(1e-5)
    assert lr_at(99, **kw) == pytest.approx(1e-3)
    mid = 100 + 450
    assert lr_at(mid, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(1000, **kw) == pytest.approx(1e-4)
    vals = [lr_at(s, **kw) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_linear_and_constant():
    assert lr_at(500, lr=2.0, max_steps=1000, schedule="constant") == 2.0
    assert lr_at(500, lr=2.0, max_steps=1000, schedule="linear", min_lr_ratio=0.0) == pytest.approx(1.0)


def test_two_stage_drops_at_split_and_wd_goes_to_zero():
    kw = dict(lr=1.5e-3, max_steps=1000, schedule="two-stage", warmup_steps=10, min_lr_ratio=0.1,
              two_stage_split=0.5, two_stage_ratio=1e-3 / 1.5e-3)
    before, after = lr_at(499, **kw), lr_at(500, **kw)
    assert after == pytest.approx(1e-3)
    assert before > after * 1.2  # a visible step down, as in BitNet b1.58
    assert lr_at(999, **kw) == pytest.approx(1e-3 + (1.5e-4 - 1e-3) * 499 / 500)
    w = dict(weight_decay=0.1, max_steps=1000, wd_schedule="two-stage", two_stage_split=0.5)
    assert wd_at(499, **w) == 0.1 and wd_at(500, **w) == 0.0


def test_unknown_schedule_raises():
    with pytest.raises(ValueError):
        lr_at(5, lr=1.0, max_steps=10, schedule="bogus")


def test_quant_schedule():
    qs = QuantSchedule(anneal_steps=100, alpha0=1.0, alpha1=8.0, lam_warmup_steps=50,
                       residual_init=0.2, residual_steps=20)
    s0, s50, s100 = quant_state_at(0, qs), quant_state_at(50, qs), quant_state_at(100, qs)
    assert s0["anneal_alpha"] == 1.0 and s0["lam"] == 0.0 and s0["residual_coef"] == pytest.approx(0.2)
    assert s50["anneal_alpha"] == pytest.approx(math.sqrt(8.0)) and s50["lam"] == 1.0
    assert s100["anneal_alpha"] is None and s100["residual_coef"] == 0.0
    off = quant_state_at(0, QuantSchedule())
    assert off == {"lam": 1.0, "anneal_alpha": None, "residual_coef": 0.0}


def test_anneal_alpha_is_geometric_and_ends_hard():
    qs = QuantSchedule(anneal_steps=40, alpha0=1.0, alpha1=16.0)
    vals = [quant_state_at(s, qs)["anneal_alpha"] for s in range(40)]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    assert vals[10] == pytest.approx(2.0) and vals[-1] < 16.0  # 16 ** (10 / 40) == 2
    assert quant_state_at(40, qs)["anneal_alpha"] is None and quant_state_at(1000, qs)["anneal_alpha"] is None
