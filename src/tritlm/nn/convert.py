"""Swap ``nn.Linear`` for ``BitLinear`` per a per-layer spec, and drive the BitLinear runtime state.

This is the hook for FP -> ternary fine-tuning and per-layer bit-width search: the model code only
builds plain Linears (or BitLinears) and ``convert`` decides per module name.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from tritlm.nn.bitlinear import BitLinear
from tritlm.nn.rmsnorm import SubNorm
from tritlm.quant.config import QuantConfig

log = logging.getLogger(__name__)

Spec = QuantConfig | Mapping[str, QuantConfig | None] | Callable[[str, nn.Linear], QuantConfig | None]
_UNSET = object()


def _resolver(spec: Spec, skip: tuple[str, ...]) -> Callable[[str, nn.Linear], QuantConfig | None]:
    if isinstance(spec, QuantConfig):
        def by_config(name: str, _m: nn.Linear) -> QuantConfig | None:
            leaf = name.rsplit(".", 1)[-1]
            hit = any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in skip)
            return None if hit else spec
        return by_config
    if isinstance(spec, Mapping):
        items = list(spec.items())

        def by_pattern(name: str, _m: nn.Linear) -> QuantConfig | None:
            for pattern, cfg in items:  # first match wins
                if fnmatch.fnmatchcase(name, pattern):
                    return cfg
            return None
        return by_pattern
    if callable(spec):
        return spec
    raise TypeError(f"spec must be a QuantConfig, a dict of patterns or a callable, got {type(spec)}")


@torch.no_grad()
def convert(model: nn.Module, spec: Spec, skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace, in place, each ``nn.Linear`` (exact type) whose spec is a QuantConfig by a BitLinear.

    ``spec``: a QuantConfig for every Linear except names matching a glob in ``skip`` (matched
    against the full dotted name and its last component); a dict ``{glob: QuantConfig | None}``
    matched against the full name, first match wins, no match or None = keep; or a callable
    ``(name, module) -> QuantConfig | None``. Weights and bias are copied (same device and dtype),
    so with an FP config the outputs are unchanged. Returns ``model``.
    """
    resolve = _resolver(spec, skip)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    swapped = 0
    for name, lin in targets:
        cfg = resolve(name, lin)
        if cfg is None:
            continue
        if name == "":
            raise ValueError("convert() swaps submodules; wrap a bare nn.Linear in a container")
        new = BitLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, config=cfg,
                        device=lin.weight.device, dtype=lin.weight.dtype)
        new.weight.copy_(lin.weight)
        new.weight.requires_grad_(lin.weight.requires_grad)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
            new.bias.requires_grad_(lin.bias.requires_grad)
        new.train(lin.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped += 1
    log.info("convert: %d of %d nn.Linear swapped for BitLinear", swapped, len(targets))
    return model


def bitlinear_modules(model: nn.Module) -> Iterator[BitLinear]:
    """Every BitLinear in ``model`` (including subclasses)."""
    return (m for m in model.modules() if isinstance(m, BitLinear))


def set_quant_state(model: nn.Module, lam: float | None = None, anneal_alpha=_UNSET,
                    residual_coef: float | None = None) -> int:
    """Set the runtime schedule state of every BitLinear; only the arguments passed are changed.

    ``lam`` also blends in the SubLN norms a fine-tune inserted (``SubNorm.inserted``), so that at
    lambda = 0 the whole student is the source model. ``anneal_alpha=None`` is a real value (hard
    quantisation), hence the sentinel default. Returns the number of BitLinears updated.
    """
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if lam is not None:
        for m in model.modules():
            if isinstance(m, SubNorm) and m.inserted:
                m.lam = float(lam)
    n = 0
    for m in bitlinear_modules(model):
        if lam is not None:
            m.lam = float(lam)
        if anneal_alpha is not _UNSET:
            m.anneal_alpha = None if anneal_alpha is None else float(anneal_alpha)
        if residual_coef is not None:
            m.residual_coef = float(residual_coef)
        n += 1
    return n


def clamp_latent_(model: nn.Module) -> None:
    """Apply each BitLinear's ``config.latent_clamp`` (call after ``optimizer.step()``)."""
    for m in bitlinear_modules(model):
        m.clamp_latent_()
