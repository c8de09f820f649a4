"""The one place a model turns a per-layer QuantConfig into a Linear module."""

from __future__ import annotations

from torch import nn

from tritlm.quant.config import QuantConfig


def make_linear(in_f: int, out_f: int, config: QuantConfig | None, bias: bool = False) -> nn.Module:
    """Plain ``nn.Linear`` when ``config`` quantises nothing (the FP twin), else a BitLinear."""
    if config is None or config.plain:
        return nn.Linear(in_f, out_f, bias=bias)
    from tritlm.nn.bitlinear import BitLinear  # lazily: FP models need no quantisation code

    return BitLinear(in_f, out_f, bias=bias, config=config)


def share_act_slot(*mods: nn.Module) -> None:
    """Layers that read one input (q/k/v, gate/up) quantise it once: a common activation slot."""
    from tritlm.nn.bitlinear import share_act_slot as share

    share(*mods)
