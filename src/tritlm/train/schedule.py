"""Learning-rate, weight-decay and quantisation schedules: pure functions of the step.

Being pure functions of the step is what makes resume exact: nothing about them is saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class QuantSchedule:
    """Schedules of the runtime quantisation state (see BitLinear.lam / anneal_alpha / residual_coef)."""

    anneal_steps: int = 0  # soft-to-hard tanh annealing over the first N steps (0 = off)
    alpha0: float = 1.0
    alpha1: float = 8.0
    # Quantisation strength lambda 0 -> 1 (gradual quantisation when fine-tuning an FP model) over
    # W steps: W = lam_warmup_frac * max_steps when that is > 0 (0.5 gives min(2t/T, 1)), else
    # lam_warmup_steps; 0 = fully quantised from the first step.
    lam_warmup_steps: int = 0
    lam_warmup_frac: float = 0.0
    # The shape of the ramp over u = t / W in [0, 1] (the Hugging Face 1.58-bit study's shapes):
    # linear min(u, 1); sigmoid and exponential with sharpness lam_k, rescaled to run 0 -> 1 exactly.
    lam_schedule: str = "linear"
    lam_k: float = 10.0
    residual_init: float = 0.0  # FP residual coefficient at step 0, annealed linearly to 0
    residual_steps: int = 0


def _ramp(step: int, steps: int, v0: float, v1: float) -> float:
    if steps <= 0 or step >= steps:
        return v1
    return v0 + (v1 - v0) * step / steps


def lr_at(step: int, *, lr: float, max_steps: int, schedule: str = "cosine", warmup_steps: int = 0,
          min_lr_ratio: float = 0.1, two_stage_split: float = 0.5, two_stage_ratio: float = 0.6) -> float:
    """LR at ``step`` (0-based).

    ``two-stage`` is BitNet b1.58's schedule: warm up to ``lr``, decay linearly to halfway between
    the two peaks, drop to ``two_stage_ratio * lr`` at ``two_stage_split`` of training, then decay
    linearly to ``min_lr_ratio * lr`` at the end.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    span = max(1, max_steps - warmup_steps)
    frac = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return lr + (min_lr - lr) * frac
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))
    if schedule == "two-stage":
        split = int(max_steps * two_stage_split)
        lr2 = lr * two_stage_ratio
        if step < split:
            # Stage 1 decays to halfway between the two peaks, so the drop at the split is a step.
            f = (step - warmup_steps) / max(1, split - warmup_steps)
            return lr + (0.5 * (lr + lr2) - lr) * f
        f = (step - split) / max(1, max_steps - split)
        return lr2 + (min_lr - lr2) * min(1.0, f)
    raise ValueError(f"unknown LR schedule {schedule!r}")


def wd_at(step: int, *, weight_decay: float, max_steps: int, wd_schedule: str = "constant",
          two_stage_split: float = 0.5) -> float:
    """Weight decay at ``step``: constant, or BitNet's two-stage (``weight_decay`` then 0)."""
    if wd_schedule == "constant":
        return weight_decay
    if wd_schedule == "two-stage":
        return weight_decay if step < int(max_steps * two_stage_split) else 0.0
    raise ValueError(f"unknown weight-decay schedule {wd_schedule!r}")


LAM_SCHEDULES = ("linear", "sigmoid", "exponential")


def lam_at(step: int, qs: QuantSchedule, max_steps: int = 0) -> float:
    """Quantisation strength lambda at ``step``: 0 = the FP model, 1 = fully quantised."""
    w = qs.lam_warmup_frac * max_steps if qs.lam_warmup_frac > 0 else qs.lam_warmup_steps
    if w <= 0 or step >= w:
        return 1.0
    u, k = step / w, qs.lam_k
    if qs.lam_schedule == "linear":
        return u
    if qs.lam_schedule == "sigmoid":
        def sig(z: float) -> float:
            return 1.0 / (1.0 + math.exp(-k * (z - 0.5)))
        return (sig(u) - sig(0.0)) / (sig(1.0) - sig(0.0))
    if qs.lam_schedule == "exponential":
        return math.expm1(k * u) / math.expm1(k)
    raise ValueError(f"unknown lambda schedule {qs.lam_schedule!r}")


def quant_state_at(step: int, qs: QuantSchedule, max_steps: int = 0) -> dict:
    """Keyword arguments for ``tritlm.nn.set_quant_state`` at ``step`` of a ``max_steps`` run."""
    alpha = None
    if qs.anneal_steps > 0 and step < qs.anneal_steps:
        alpha = qs.alpha0 * (qs.alpha1 / qs.alpha0) ** (step / qs.anneal_steps)
    return {
        "lam": lam_at(step, qs, max_steps),
        "anneal_alpha": alpha,
        "residual_coef": _ramp(step, qs.residual_steps, qs.residual_init, 0.0),
    }
