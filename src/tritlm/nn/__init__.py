"""Modules built on ``tritlm.quant``: BitLinear, RMSNorm, and the Linear -> BitLinear converter."""

from __future__ import annotations

from tritlm.nn.bitlinear import BitLinear, set_kernel
from tritlm.nn.convert import bitlinear_modules, clamp_latent_, convert, set_quant_state
from tritlm.nn.linear import make_linear
from tritlm.nn.rmsnorm import RMSNorm

__all__ = ["BitLinear", "RMSNorm", "bitlinear_modules", "clamp_latent_", "convert", "make_linear",
           "set_kernel", "set_quant_state"]
