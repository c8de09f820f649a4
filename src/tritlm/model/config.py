"""Model configuration: a typed dataclass, size presets, and the full-precision twin of each."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from tritlm.errors import ConfigError
from tritlm.quant.config import FP, QuantConfig

MLPKind = Literal["swiglu", "relu2"]


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
    init_std: float = 0.02

    def __post_init__(self) -> None:
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

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def quantised(self) -> bool:
        return self.quant.quantised

    def fp_twin(self) -> ModelConfig:
        """The same architecture with full-precision Linear layers."""
        return dataclasses.replace(self, quant=FP)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        q = d.pop("quant", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        quant = QuantConfig() if q is None else quant_from_dict(q)
        return cls(quant=quant, **d)


def quant_from_dict(d: dict[str, Any] | str) -> QuantConfig:
    if isinstance(d, str):  # shorthand: "ternary" | "binary" | "fp"
        return FP if d == "fp" else QuantConfig(weight=d)  # type: ignore[arg-type]
    names = {f.name for f in dataclasses.fields(QuantConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown quant config key(s): {', '.join(unknown)}")
    if d.get("weight", "ternary") not in ("fp", "ternary", "binary"):
        raise ConfigError(f"quant.weight must be fp, ternary or binary, got {d['weight']!r}")
    return QuantConfig(**d)


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
