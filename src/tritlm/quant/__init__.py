"""Quantisation math: pure functions on tensors (no modules, no I/O)."""

from tritlm.quant.activations import absmax_int8
from tritlm.quant.config import BINARY, FP, TERNARY, QuantConfig
from tritlm.quant.ste import (
    anneal_alpha,
    clamp_latent_,
    linear_ramp,
    mix,
    soft_binary,
    soft_ternary,
    ste,
)
from tritlm.quant.weights import absmean_ternary, quantize_weight, sign_binary, threshold_ternary

__all__ = [
    "BINARY", "FP", "TERNARY", "QuantConfig",
    "absmax_int8", "absmean_ternary", "anneal_alpha", "clamp_latent_", "linear_ramp", "mix",
    "quantize_weight", "sign_binary", "soft_binary", "soft_ternary", "ste", "threshold_ternary",
]
