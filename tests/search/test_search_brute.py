"""The search on a 4-unit model against brute force over all 4^4 configurations, each measured.

Four options (binary, ternary, int4, fp16) keep brute force to seconds; int8 sits next to fp16
on this model and adds nothing to the comparison."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import CTX
from tritlm.formats.ptq import requantize
from tritlm.quant.config import FP
from tritlm.search.plan import Problem, choose, evaluate_pick
from tritlm.search.sensitivity import calib_loss, fisher_sensitivity, measured_sensitivity
from tritlm.search.units import make_units, parse_options, size_table


@pytest.fixture(scope="module")
def world(tiny):
    """The problem and the measured calibration loss of every configuration."""
    model, _, calib, _, _ = tiny
    units = make_units(model.cfg, "qkv")
    assert len(units) == 4
    options = parse_options("binary,ternary,int4,fp16")
    sizes = size_table(model.cfg, units, options)
    sens = measured_sensitivity(model, calib, units, options, CTX)
    problem = Problem(tuple(units), tuple(options), sizes, sens)
    every = {}
    for picks in itertools.product(range(len(options)), repeat=len(units)):
        # an independent path to the same model: explicit per-layer overrides, default FP
        ov = tuple((n, options[j].quant) for u, j in zip(units, picks) for n in u.linears)
        every[picks] = (problem.nbytes(picks), calib_loss(requantize(model, FP, ov), calib, CTX))
    return model, calib, problem, every


def _budgets(problem):
    lo, hi = int(problem.sizes.min(1).sum()), int(problem.sizes.max(1).sum())
    return sorted({int(x) for x in np.geomspace(lo, hi, 9)})


def test_the_pick_is_within_2_percent_of_the_best_that_fits_and_never_over(world):
    model, calib, problem, every = world
    spread = []
    for b in _budgets(problem):
        fits = {p: v for p, v in every.items() if v[0] <= b}
        best = min(loss for _, loss in fits.values())
        worst = max(loss for _, loss in fits.values())
        dp, greedy = choose(problem, b)
        assert dp.bytes <= b and greedy.bytes <= b
        assert dp.bytes == every[dp.picks][0]  # the real bytes, as brute force counts them
        got = evaluate_pick(problem, model, "dp", dp, lambda m: calib_loss(m, calib, CTX))
        assert got.measured == pytest.approx(every[dp.picks][1], rel=1e-9)  # same model both ways
        assert got.measured <= 1.02 * best, (b, got.measured, best)
        spread.append(worst / best)
    assert max(spread) > 1.1  # the configurations differ by far more than 2%: the margin is a real test


def test_measured_loss_does_not_rise_as_the_budget_grows(world):
    _, _, problem, every = world
    losses = [every[choose(problem, b)[0].picks][1] for b in _budgets(problem)]
    for a, b in zip(losses, losses[1:]):
        assert b <= a * 1.005, losses  # within noise: the prediction is additive, the model is not
    assert losses[-1] < losses[0] * 0.9


def test_the_pick_beats_random_configurations_of_the_same_size(world):
    _, _, problem, every = world
    compared = 0
    for b in _budgets(problem)[1:-1]:
        dp = choose(problem, b)[0]
        same = [loss for p, (nb, loss) in every.items() if 0.9 * dp.bytes <= nb <= b and p != dp.picks]
        if len(same) >= 3:
            assert every[dp.picks][1] < np.mean(same), b
            compared += 1
    assert compared >= 3


def test_predicted_is_base_plus_the_sum_of_increases(world):
    model, calib, problem, every = world
    base = every[(3, 3, 3, 3)][1]  # every unit fp16 = the FP model
    assert problem.sens.base_loss == pytest.approx(base, rel=1e-12)
    for i in range(4):
        for j in range(4):
            picks = [3] * 4
            picks[i] = j
            assert problem.sens.delta[i, j] == pytest.approx(every[tuple(picks)][1] - base, abs=1e-9)
    p = (0, 1, 2, 3)
    assert problem.predicted(p) == pytest.approx(base + sum(problem.sens.delta[i, j] for i, j in enumerate(p)))


def test_the_fisher_estimate_orders_kinds_and_finds_the_most_sensitive_unit(world):
    model, calib, problem, _ = world
    f = fisher_sensitivity(model, calib, problem.units, problem.options, CTX)
    assert f.method == "fisher"
    assert f.base_loss == pytest.approx(problem.sens.base_loss, rel=0.02)
    assert (f.delta[:, 3] == 0).all()
    for i in range(4):  # more weight error, more predicted loss: binary > ternary > int4 > 0
        assert f.delta[i, 0] > f.delta[i, 1] > f.delta[i, 2] > 0
    assert np.argmax(f.delta[:, 0]) == np.argmax(problem.sens.delta[:, 0])
