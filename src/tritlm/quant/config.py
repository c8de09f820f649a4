"""Typed configuration of how a layer is quantised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WeightMode = Literal["fp", "ternary", "binary"]


@dataclass(frozen=True)
class QuantConfig:
    """How one BitLinear quantises its weights and inputs.

    The schedule-driven quantities (lambda, annealing sharpness, FP-residual coefficient) are not
    here: they change every step, so the trainer sets them on the modules (see
    ``tritlm.nn.set_quant_state``) as a pure function of the step.
    """

    weight: WeightMode = "ternary"
    # Bits of the per-token absmax activation quantisation; None keeps activations in float.
    act_bits: int | None = 8
    # BitLinear's own parameter-free RMSNorm on its input (BitNet FAQ variant).
    input_norm: bool = False
    # Multiplier on the straight-through gradient of the weights.
    ste_scale: float = 1.0
    # Latent weights are clamped to [-c, c] after each optimiser step; None = no clamp.
    latent_clamp: float | None = None
    # Ternary only: zero the weights with |W| < t * mean|W| and scale by the mean of the kept |W|
    # (TWN); None = BitNet's round(W / mean|W|) clipped to [-1, 1].
    dynamic_threshold: float | None = None
    eps: float = 1e-5

    @property
    def quantised(self) -> bool:
        return self.weight != "fp"


FP = QuantConfig(weight="fp", act_bits=None)
TERNARY = QuantConfig()
BINARY = QuantConfig(weight="binary")
