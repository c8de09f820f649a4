"""Typed configuration of how a layer is quantised."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

WeightMode = Literal["fp", "ternary", "binary", "int8", "int4"]
ScaleMode = Literal["tensor", "channel"]
WEIGHT_MODES: tuple[str, ...] = ("fp", "ternary", "binary", "int8", "int4")
INT4_GROUPS: tuple[int, ...] = (32, 64, 128)
# Bits each weight of a kind occupies when packed (the CPU runtime's layouts; scales come on top).
WEIGHT_BITS = {"ternary": 2, "binary": 1, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantConfig:
    """How one BitLinear quantises its weights and inputs.

    The schedule-driven quantities (lambda, annealing sharpness, FP-residual coefficient) are not
    here: they change every step, so the trainer sets them on the modules (see
    ``tritlm.nn.set_quant_state``) as a pure function of the step.
    """

    # fp | ternary (absmean) | binary (sign) | int8 (absmax per output channel) |
    # int4 (absmax per group of ``group_size`` weights along K).
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
    # Ternary / binary: one scale per tensor (BitNet, the default) or one per output channel.
    # int8 is always per channel and int4 always per group.
    scale: ScaleMode = "tensor"
    # int4 only: weights per scale along the input dimension (32, 64 or 128).
    group_size: int = 64
    eps: float = 1e-5

    def __post_init__(self) -> None:
        def number(name: str, v, positive: bool = True) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
                raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite number, got {v!r}")

        if self.act_bits is not None and (isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int)
                                          or not 2 <= self.act_bits <= 16):
            raise ValueError(f"act_bits must be an integer in [2, 16] or null, got {self.act_bits!r}")
        if not isinstance(self.input_norm, bool):
            raise ValueError(f"input_norm must be true or false, got {self.input_norm!r}")
        number("ste_scale", self.ste_scale)
        number("eps", self.eps)
        if self.latent_clamp is not None:
            number("latent_clamp", self.latent_clamp)
        if self.dynamic_threshold is not None:
            number("dynamic_threshold", self.dynamic_threshold)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ValueError(f"group_size must be an integer, got {self.group_size!r}")
        if self.weight not in WEIGHT_MODES:
            raise ValueError(f"weight must be one of {', '.join(WEIGHT_MODES)}, got {self.weight!r}")
        if self.scale not in ("tensor", "channel"):
            raise ValueError(f"scale must be 'tensor' or 'channel', got {self.scale!r}")
        if self.weight == "int4" and self.group_size not in INT4_GROUPS:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUPS}, got {self.group_size}")

    @property
    def quantised(self) -> bool:
        return self.weight != "fp"

    @property
    def plain(self) -> bool:
        """True when the layer is exactly ``nn.Linear`` (no weight, activation or input quantisation)."""
        return not self.quantised and self.act_bits is None and not self.input_norm

    @property
    def per_channel(self) -> bool:
        return self.weight == "int8" or (self.weight in ("ternary", "binary") and self.scale == "channel")

    @property
    def kind(self) -> str:
        """Short name of the weight kind, e.g. ``ternary``, ``int4-g64``, ``binary-ch``."""
        if self.weight == "int4":
            return f"int4-g{self.group_size}"
        if self.weight in ("ternary", "binary") and self.scale == "channel":
            return f"{self.weight}-ch"
        return self.weight


FP = QuantConfig(weight="fp", act_bits=None)
TERNARY = QuantConfig()
BINARY = QuantConfig(weight="binary")
INT8 = QuantConfig(weight="int8")
INT4 = QuantConfig(weight="int4")
