"""Quantisation math: pure functions on tensors (no modules, no I/O)."""

from tritlm.quant.activations import absmax_int8
from tritlm.quant.config import BINARY, FP, INT4, INT8, TERNARY, WEIGHT_MODES, QuantConfig
from tritlm.quant.ste import (
    clamp_latent_,
    mix,
    soft_binary,
    soft_ternary,
    ste,
)
from tritlm.quant.weights import (
    absmax_int4,
    absmax_int8_weight,
    absmean_ternary,
    dequantize,
    expand_scale,
    quantize_weight,
    sign_binary,
    threshold_ternary,
)

__all__ = [
    "BINARY", "FP", "INT4", "INT8", "TERNARY", "WEIGHT_MODES", "QuantConfig",
    "absmax_int4", "absmax_int8_weight", "dequantize", "expand_scale",
    "absmax_int8", "absmean_ternary", "clamp_latent_", "mix",
    "quantize_weight", "sign_binary", "soft_binary", "soft_ternary", "ste", "threshold_ternary",
]
