"""What the search chooses between: units (groups of block Linears that share one kind), options
(the kinds a unit may take) and the real packed bytes of each unit in each option.

Bytes are what ``tritlm pack`` writes for a layer (levels with their layout's padding, plus float32
scales), computed from the packing layouts of :mod:`tritlm.kernels.pack` and
:mod:`tritlm.kernels.pack_rows` without packing anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tritlm.errors import ConfigError
from tritlm.model.config import ModelConfig, QuantOverrides
from tritlm.quant.config import FP, INT4_GROUPS, QuantConfig

UNIT_MODES = ("linear", "qkv", "block")
DEFAULT_OPTIONS = ("binary", "ternary", "int4", "int8", "fp16")
# q/k/v read one input, gate/up read one input: a kernel can fuse a group only when it shares a kind.
_GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o_proj",
           "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down_proj"}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Unit:
    """Block Linears that always take the same kind; ``name`` labels tables and plots."""

    name: str
    linears: tuple[str, ...]


def make_units(cfg: ModelConfig, mode: str = "linear") -> list[Unit]:
    """``linear``: each block Linear; ``qkv``: q/k/v together, gate/up together, o and down alone;
    ``block``: the seven Linears of each layer together. In model order."""
    if mode not in UNIT_MODES:
        raise ConfigError(f"--units must be one of {', '.join(UNIT_MODES)}, got {mode!r}")
    names = cfg.linear_names()
    if mode == "linear":
        return [Unit(n, (n,)) for n in names]
    out: dict[str, list[str]] = {}
    for n in names:
        layer = ".".join(n.split(".")[:2])  # layers.<i>
        key = layer if mode == "block" else f"{layer}.{_GROUPS[n.rsplit('.', 1)[1]]}"
        out.setdefault(key, []).append(n)
    return [Unit(k, tuple(v)) for k, v in out.items()]


@dataclass(frozen=True)
class Option:
    """A kind a unit may take: its name on the command line and its QuantConfig."""

    name: str
    quant: QuantConfig

    def spec_fields(self) -> dict[str, Any]:
        """The spec-file fields of this kind. act_bits is written out because ``tritlm pack`` resolves
        missing fields against the model's default, which for an FP source has no activation bits."""
        q = self.quant
        if not q.quantised:
            return {"weight": "fp"}
        d: dict[str, Any] = {"weight": q.weight, "act_bits": q.act_bits}
        if q.weight in ("ternary", "binary") and q.scale == "channel":
            d["scale"] = "channel"
        if q.weight == "int4":
            d["group_size"] = q.group_size
        return d


def option(name: str) -> Option:
    """``binary``, ``ternary`` (``-ch``: a scale per row), ``int8``, ``int4`` (groups of 64;
    ``int4-g32`` / ``-g128``), ``fp16`` (a plain Linear, stored in fp16)."""
    base, _, suffix = name.partition("-")
    if base in ("ternary", "binary") and suffix in ("", "ch"):
        return Option(name, QuantConfig(weight=base, scale="channel" if suffix else "tensor"))  # type: ignore[arg-type]
    if base == "int8" and not suffix:
        return Option(name, QuantConfig(weight="int8"))
    if base == "int4" and (not suffix or suffix in {f"g{g}" for g in INT4_GROUPS}):
        return Option(name, QuantConfig(weight="int4", group_size=int(suffix[1:]) if suffix else 64))
    if name in ("fp16", "fp"):
        return Option("fp16", FP)
    raise ConfigError(f"unknown option {name!r}; choose from binary, ternary, int4, int8, fp16 "
                      "(also ternary-ch, binary-ch, int4-g32, int4-g128)")


def parse_options(text: str | Sequence[str]) -> list[Option]:
    """Options from ``binary,ternary,int8`` (or a list of names), duplicates refused."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--options: give at least one option")
    opts = [option(n) for n in names]
    if len({o.name for o in opts}) != len(opts):
        raise ConfigError(f"--options lists an option twice: {','.join(names)}")
    return opts


def packed_linear_bytes(n: int, k: int, q: QuantConfig, fp_dtype: str = "fp16", ternary_layout: str = "i2s") -> int:
    """Bytes ``tritlm pack`` stores for an ``[n, k]`` Linear of kind ``q``: levels in the kernel
    layout (padding included) + 4 bytes per scale; an FP layer at ``fp_dtype``."""
    if not q.quantised:
        return n * k * (2 if fp_dtype == "fp16" else 4)
    if q.weight == "int4":
        return n * _ceil(k, 64) * 32 + 4 * n * _ceil(k, q.group_size)  # i4_k64, scales [n, groups]
    scales = 4 * (n if q.per_channel else 1)
    if q.weight == "int8":
        return n * _ceil(k, 32) * 32 + scales  # i8_k32
    if q.weight == "binary":
        return n * _ceil(k, 128) * 16 + scales  # b1_k128
    if ternary_layout == "base3":
        return n * _ceil(k, 5) + scales  # 5 weights a byte
    return _ceil(n, 4) * 4 * _ceil(k, 128) * 32 + scales  # i2s_r4: rows padded to 4, K to 128


def size_table(cfg: ModelConfig, units: Sequence[Unit], options: Sequence[Option], **kw: Any) -> np.ndarray:
    """int64 ``[units, options]``: packed bytes of each unit in each option."""
    shapes = cfg.linear_shapes()
    return np.array([[sum(packed_linear_bytes(*shapes[n], o.quant, **kw) for n in u.linears) for o in options]
                     for u in units], dtype=np.int64)


def block_params(cfg: ModelConfig) -> int:
    """Weights of all block Linears (the denominator of bits per weight)."""
    return sum(n * k for n, k in cfg.linear_shapes().values())


def overrides_for(units: Sequence[Unit], options: Sequence[Option], picks: Sequence[int]) -> QuantOverrides:
    """Per-layer overrides naming every block Linear of every unit with its picked option."""
    return tuple((n, options[j].quant) for u, j in zip(units, picks, strict=True) for n in u.linears)
