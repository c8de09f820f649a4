"""Modules built on ``tritlm.quant``: BitLinear, RMSNorm, and the Linear -> BitLinear converter."""

from __future__ import annotations

from torch import nn

from tritlm.nn.bitlinear import BitLinear
from tritlm.nn.convert import bitlinear_modules, clamp_latent_, convert, set_quant_state
from tritlm.nn.rmsnorm import RMSNorm
from tritlm.quant.config import QuantConfig


def make_linear(in_f: int, out_f: int, config: QuantConfig | None, bias: bool = False) -> nn.Module:
    """The Linear a model should build: plain ``nn.Linear`` unless ``config`` quantises something."""
    if config is None or (not config.quantised and config.act_bits is None and not config.input_norm):
        return nn.Linear(in_f, out_f, bias=bias)
    return BitLinear(in_f, out_f, bias=bias, config=config)


__all__ = ["BitLinear", "RMSNorm", "bitlinear_modules", "clamp_latent_", "convert", "make_linear",
           "set_quant_state"]
