"""One search: sizes and sensitivities in, the exact and the greedy pick for a budget out, each
with its predicted loss (base + the sum of its units' increases) and its loss measured for real."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tritlm.model.transformer import Transformer
from tritlm.search.knapsack import Pick, solve_dp, solve_greedy
from tritlm.search.sensitivity import Sensitivity, configured
from tritlm.search.units import Option, Unit

LossFn = Callable[[Transformer], float]  # a model -> its loss (nats / token) on some text


@dataclass(frozen=True)
class Problem:
    """Everything the choice depends on: units, options, ``sizes[u, o]`` (real packed bytes) and the
    sensitivities ``delta[u, o]``."""

    units: tuple[Unit, ...]
    options: tuple[Option, ...]
    sizes: np.ndarray
    sens: Sensitivity

    def predicted(self, picks: Sequence[int]) -> float:
        """Base loss + the sum of the picked increases (the additive model the knapsack optimises)."""
        return self.sens.base_loss + float(self.sens.delta[np.arange(len(picks)), list(picks)].sum())

    def nbytes(self, picks: Sequence[int]) -> int:
        return int(self.sizes[np.arange(len(picks)), list(picks)].sum())

    def uniform(self, j: int) -> tuple[int, ...]:
        return (j,) * len(self.units)

    def model(self, model: Transformer, picks: Sequence[int]) -> Transformer:
        """``model`` re-quantised to the configuration ``picks``."""
        return configured(model, self.units, self.options, list(picks))

    def labels(self, picks: Sequence[int]) -> list[str]:
        return [self.options[j].name for j in picks]


@dataclass(frozen=True)
class Outcome:
    """A pick with its predicted loss and, when measured, its real loss on the calibration text and
    on held-out text."""

    method: str  # dp | greedy
    pick: Pick
    predicted: float
    measured: float | None = None
    heldout: float | None = None


def choose(problem: Problem, budget: int) -> tuple[Pick, Pick]:
    """(exact DP pick, greedy pick) for ``budget`` bytes."""
    return (solve_dp(problem.sens.delta, problem.sizes, budget),
            solve_greedy(problem.sens.delta, problem.sizes, budget))


def evaluate_pick(problem: Problem, model: Transformer, method: str, pick: Pick, calib: LossFn,
                  heldout: LossFn | None = None) -> Outcome:
    """Re-quantise ``model`` to ``pick`` and measure it (``calib``; ``heldout`` too when given)."""
    m = problem.model(model, pick.picks)
    return Outcome(method, pick, problem.predicted(pick.picks), calib(m), heldout(m) if heldout else None)
