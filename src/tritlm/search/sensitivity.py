"""How much each unit costs in each option: the increase of the calibration loss when that unit
alone takes the option and every other block Linear stays in full precision.

Two estimates: :func:`measured_sensitivity` quantises each unit in each option for real (the
same :func:`~tritlm.formats.ptq.requantize` ``tritlm pack`` uses) and measures the loss;
:func:`fisher_sensitivity` is HAWQ's cheaper second-order estimate from one backward pass per
calibration window, ``0.5 * sum(F * (Q(W) - W)^2)`` with F the diagonal empirical Fisher. The
Fisher estimate ignores activation quantisation and interactions beyond second order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tritlm.eval.perplexity import perplexity
from tritlm.formats.ptq import effective_weight, requantize
from tritlm.model.transformer import Transformer
from tritlm.quant.config import FP
from tritlm.quant.weights import expand_scale, quantize_weight
from tritlm.search.units import Option, Unit, overrides_for

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (evaluations done, evaluations in all)


@dataclass(frozen=True)
class Sensitivity:
    """``delta[u, o]``: loss increase (nats / token) of unit ``u`` alone in option ``o``, over
    ``base_loss`` (every block Linear full precision)."""

    base_loss: float
    delta: np.ndarray
    method: str  # measured | fisher


def calib_loss(model: Transformer, ids: torch.Tensor, ctx: int, batch_size: int = 16) -> float:
    """Mean next-token loss (nats) over non-overlapping windows of ``ctx`` tokens (``tritlm eval``'s
    ``chunks`` protocol, float64)."""
    return perplexity(model, ids, protocol="chunks", ctx=ctx, batch_size=batch_size).nll


def configured(model: Transformer, units: Sequence[Unit], options: Sequence[Option],
               picks: Sequence[int | None]) -> Transformer:
    """``model`` with each unit in its picked option (``None``: full precision), the rest full precision."""
    chosen = [(u, j) for u, j in zip(units, picks, strict=True) if j is not None]
    ov = overrides_for([u for u, _ in chosen], options, [j for _, j in chosen])
    return requantize(model, FP, ov)


def is_base(opt: Option) -> bool:
    """True for the full-precision option: the unit in it is the base model itself (requantize keeps
    the layers bit for bit), so its increase is 0 without an evaluation."""
    return opt.quant == FP


def measured_sensitivity(model: Transformer, ids: torch.Tensor, units: Sequence[Unit], options: Sequence[Option],
                         ctx: int, batch_size: int = 16, progress: Progress | None = None) -> Sensitivity:
    """Loss of ``model`` with one unit in one option (all other Linears FP), for every pair."""
    base_model = configured(model, units, options, [None] * len(units))
    base = calib_loss(base_model, ids, ctx, batch_size)
    del base_model
    todo = [(i, j) for i in range(len(units)) for j in range(len(options)) if not is_base(options[j])]
    delta = np.zeros((len(units), len(options)))
    if progress is not None:
        progress(0, len(todo))
    for done, (i, j) in enumerate(todo, 1):
        picks: list[int | None] = [None] * len(units)
        picks[i] = j
        delta[i, j] = calib_loss(configured(model, units, options, picks), ids, ctx, batch_size) - base
        if progress is not None:
            progress(done, len(todo))
    log.info("measured sensitivity: %d evaluations, base loss %.4f", len(todo), base)
    return Sensitivity(base, delta, "measured")


def _quant_error(w: torch.Tensor, opt: Option) -> torch.Tensor:
    q = opt.quant
    if not q.quantised:
        return w.half().float() - w  # stored in fp16
    lv, scale = quantize_weight(w, q)
    return lv.float() * expand_scale(scale.float(), tuple(lv.shape), q.group_size) - w


def fisher_sensitivity(model: Transformer, ids: torch.Tensor, units: Sequence[Unit], options: Sequence[Option],
                       ctx: int, progress: Progress | None = None) -> Sensitivity:
    """HAWQ-style estimate: ``delta[u, o] = 0.5 * sum over the unit's weights of F * dW^2``.

    F is the diagonal empirical Fisher of the mean token loss, from per-window gradients: with
    ``m`` scored tokens a window, ``E[g_w^2] ~ E[g_t^2] / m``, so ``F ~ m * mean_w(g_w^2)``.
    """
    base = configured(model, units, options, [None] * len(units)).train(False)
    names = [n for u in units for n in u.linears]
    params = {n: base.get_submodule(n).weight for n in names}
    for p in base.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    n_win = ids.numel() // (ctx + 1)
    if n_win < 1:
        n_win, ctx = 1, ids.numel() - 1
    total_loss = 0.0
    for w in range(n_win):
        x = ids[w * (ctx + 1):(w + 1) * (ctx + 1)].view(1, -1)
        _, loss = base(x[:, :-1], x[:, 1:])
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads):
            fisher[n] += g.double().pow(2)
        total_loss += float(loss.detach())
        if progress is not None:
            progress(w + 1, n_win)
    delta = np.zeros((len(units), len(options)))
    with torch.no_grad():
        for i, u in enumerate(units):
            for j, opt in enumerate(options):
                if is_base(opt):
                    continue
                s = 0.0
                for n in u.linears:
                    f = fisher[n] * (ctx / n_win)
                    dw = _quant_error(effective_weight(base.get_submodule(n)), opt).double()
                    s += 0.5 * float((f * dw.pow(2)).sum())
                delta[i, j] = s
    return Sensitivity(total_loss / n_win, delta, "fisher")
