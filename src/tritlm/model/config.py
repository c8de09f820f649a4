"""Model configuration: a typed dataclass, size presets, and the full-precision twin of each."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tritlm.errors import ConfigError
from tritlm.quant.config import FP, WEIGHT_MODES, QuantConfig

MLPKind = Literal["swiglu", "relu2"]
# Ordered per-layer overrides: (glob over block Linear names, QuantConfig); the first match wins.
QuantOverrides = tuple[tuple[str, QuantConfig], ...]
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Upper bounds of the integer sizes (far above any real model; below what would allocate by mistake).
_INT_BOUNDS = {"vocab_size": 1 << 24, "dim": 1 << 17, "n_layers": 1 << 12, "n_heads": 1 << 12,
               "n_kv_heads": 1 << 12, "ffn_dim": 1 << 19, "max_seq_len": 1 << 22}
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. Parameter names follow Hugging Face Llama/BitNet so that the
    state-dict adapters for export stay trivial."""

    vocab_size: int = 32000
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    ffn_dim: int = 344
    max_seq_len: int = 256
    mlp: MLPKind = "swiglu"  # swiglu = SiLU-gated; relu2 = gated ReLU^2 (BitNet b1.58 2B4T)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qk_norm: bool = False
    # Multiplies each sub-layer's output before it joins the residual stream.
    residual_scale: float = 1.0
    tie_embeddings: bool = False
    # SubLN as in BitNet b1.58 2B4T: RMSNorm before o_proj and before down_proj.
    sub_norm: bool = False
    # How the Linear layers of the blocks are quantised; the LM head and embeddings stay FP.
    quant: QuantConfig = field(default_factory=QuantConfig)
    # Per-layer kinds: ordered (glob, QuantConfig) pairs matched against block Linear names such as
    # ``layers.0.self_attn.q_proj``; the first match wins, no match = ``quant``.
    quant_overrides: QuantOverrides = ()
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # types and sane bounds first: configs come from files (checkpoints, packed folders) and
        # size allocations, so a wrong type or an absurd size must stop here, in one line
        for name, hi in _INT_BOUNDS.items():
            v = getattr(self, name)
            if v is None and name == "n_kv_heads":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
            if not 1 <= v <= hi:
                raise ConfigError(f"{name} must lie in [1, {hi}], got {v}")
        for name in ("norm_eps", "rope_theta", "residual_scale", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
        for name in ("qk_norm", "tie_embeddings", "sub_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.quant, QuantConfig):
            raise ConfigError(f"quant must be a quant config, got {self.quant!r}")
        if self.dim * self.vocab_size > 1 << 36 or self.dim * self.ffn_dim * self.n_layers > 1 << 40:
            raise ConfigError(f"model of dim {self.dim}, vocab {self.vocab_size}, ffn {self.ffn_dim} and "
                              f"{self.n_layers} layers is beyond any size tritlm can hold")
        kv = self.kv_heads
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % kv:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {kv}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mlp not in ("swiglu", "relu2"):
            raise ConfigError(f"mlp must be 'swiglu' or 'relu2', got {self.mlp!r}")
        for pair in self.quant_overrides:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], QuantConfig)):
                raise ConfigError(f"quant_overrides entries must be (glob, QuantConfig) pairs, got {pair!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def quantised(self) -> bool:
        """True when any block Linear has quantised weights."""
        return self.quant.quantised or any(q.quantised for _, q in self.quant_overrides)

    def linear_names(self) -> list[str]:
        """Names (without ``.weight``) of every Linear inside the blocks, e.g. ``layers.0.mlp.up_proj``."""
        out = []
        for i in range(self.n_layers):
            out += [f"layers.{i}.self_attn.{n}" for n in ATTN_LINEARS]
            out += [f"layers.{i}.mlp.{n}" for n in MLP_LINEARS]
        return out

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (out, in)}`` of every block Linear."""
        hd, h, kv, d, f = self.head_dim, self.n_heads, self.kv_heads, self.dim, self.ffn_dim
        per = {"q_proj": (h * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d), "o_proj": (d, h * hd),
               "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
        return {n: per[n.rsplit(".", 1)[1]] for n in self.linear_names()}

    def quant_for(self, name: str) -> QuantConfig:
        """The QuantConfig of the block Linear ``name``: the first matching override, else ``quant``."""
        for pattern, q in self.quant_overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return q
        return self.quant

    def layer_quants(self) -> dict[str, QuantConfig]:
        """``{name: QuantConfig}`` of every block Linear, in model order."""
        return {n: self.quant_for(n) for n in self.linear_names()}

    @property
    def uniform_quant(self) -> QuantConfig | None:
        """The one QuantConfig every block Linear uses, or None when the kinds are mixed."""
        qs = set(self.layer_quants().values()) if self.quant_overrides else {self.quant}
        return next(iter(qs)) if len(qs) == 1 else None

    def fp_twin(self) -> ModelConfig:
        """The same architecture with full-precision Linear layers."""
        return dataclasses.replace(self, quant=FP, quant_overrides=())

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # ordered {glob: full QuantConfig dict}: every field resolved, so a reload is exact
        d["quant_overrides"] = {g: dataclasses.asdict(q) for g, q in self.quant_overrides}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"the model config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        q = d.pop("quant", None)
        ov = d.pop("quant_overrides", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        quant = QuantConfig() if q is None else quant_from_dict(q)
        overrides = quant_overrides_from(ov, quant) if ov else ()
        try:
            return cls(quant=quant, quant_overrides=overrides, **d)
        except TypeError as e:
            raise ConfigError(f"invalid model config: {e}") from None


def quant_from_dict(d: Mapping[str, Any] | str, base: QuantConfig | None = None) -> QuantConfig:
    """A QuantConfig from a dict of its fields or a kind shorthand (``ternary``, ``int8``, ``fp``...).

    Fields not given come from ``base`` (default: QuantConfig()). ``weight: fp`` without an explicit
    ``act_bits`` means a plain full-precision Linear (activations not quantised either).
    """
    base = base if base is not None else QuantConfig()
    if isinstance(d, str):
        d = {"weight": d}
    if not isinstance(d, Mapping):
        raise ConfigError(f"a quant config must be a mapping or a kind name, got {d!r}")
    names = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown quant config key(s): {', '.join(unknown)}")
    if d.get("weight", base.weight) not in WEIGHT_MODES:
        raise ConfigError(f"quant.weight must be one of {', '.join(WEIGHT_MODES)}, got {d['weight']!r}")
    d = dict(d)
    if d.get("weight") == "fp" and "act_bits" not in d:
        d["act_bits"] = None
    try:
        return dataclasses.replace(base, **d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid quant config {dict(d)}: {e}") from None


def quant_overrides_from(spec: Any, base: QuantConfig) -> QuantOverrides:
    """Ordered overrides from ``{glob: fields-or-kind}`` (YAML / JSON) or ``[(glob, ...)]`` pairs.

    Each entry's fields are applied over ``base`` (the model's default ``quant``), so
    ``"*.down_proj": {weight: int4}`` keeps the default activation bits.
    """
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, (list, tuple)):
        items = []
        for pair in spec:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise ConfigError(f"quant_overrides entries must be [glob, config] pairs, got {pair!r}")
            items.append(tuple(pair))
    else:
        raise ConfigError(f"quant_overrides must map globs to quant configs, got {type(spec).__name__}")
    out = []
    for glob, q in items:
        if not isinstance(glob, str) or not glob:
            raise ConfigError(f"quant_overrides keys must be non-empty globs, got {glob!r}")
        out.append((glob, q if isinstance(q, QuantConfig) else quant_from_dict(q, base)))
    return tuple(out)


def load_quant_spec(path: str | Path) -> dict[str, Any]:
    """Read a per-layer spec file: a YAML (or JSON) mapping ``{glob: fields or kind}``, e.g.

    ``"layers.*.self_attn.*": {weight: int8}`` and ``"*.down_proj": {weight: int4, group_size: 64}``.
    Returns the mapping in file order (validated by :func:`quant_overrides_from`).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"quant spec {p}: no such file")
    try:
        d = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"quant spec {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, Mapping) or not d:
        raise ConfigError(f"quant spec {p}: expected a mapping of globs to quant configs")
    quant_overrides_from(d, QuantConfig())  # fail early, naming the file
    return dict(d)


def _llama_ffn(dim: int, multiple: int = 256) -> int:
    hidden = int(8 * dim / 3)
    return multiple * ((hidden + multiple - 1) // multiple)


# Shapes: TitanBit's 125M-3B (hidden, layers), BitNet b1.58 700M (16 heads, FFN 4096) and 2B4T.
PRESETS: dict[str, ModelConfig] = {
    # nanoGPT's CPU shakespeare shape (4 layers, 4 heads, 128 dims, context 64); FFN 344 ~ 8/3*128
    # keeps the SwiGLU parameter count equal to a 4x GELU MLP. Vocab is set from the tokenizer.
    "tiny": ModelConfig(vocab_size=65, dim=128, n_layers=4, n_heads=4, ffn_dim=344, max_seq_len=64),
    "125M": ModelConfig(dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=2048),
    "350M": ModelConfig(dim=1024, n_layers=24, n_heads=16, ffn_dim=_llama_ffn(1024), max_seq_len=2048),
    "700M": ModelConfig(dim=1536, n_layers=24, n_heads=16, ffn_dim=4096, max_seq_len=2048),
    "1.3B": ModelConfig(dim=2048, n_layers=24, n_heads=32, ffn_dim=_llama_ffn(2048), max_seq_len=2048),
    "3B": ModelConfig(dim=3200, n_layers=26, n_heads=32, ffn_dim=8640, max_seq_len=2048),
    "bitnet-2b4t": ModelConfig(
        vocab_size=128256, dim=2560, n_layers=30, n_heads=20, n_kv_heads=5, ffn_dim=6912,
        max_seq_len=4096, mlp="relu2", rope_theta=500000.0, tie_embeddings=True, sub_norm=True,
        norm_eps=1e-5,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
