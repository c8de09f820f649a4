"""Parameter counts and memory footprints of a config, computed without building the model."""

from __future__ import annotations

from dataclasses import dataclass

from tritlm.model.config import ModelConfig
from tritlm.quant.config import WEIGHT_BITS, QuantConfig


def ideal_linear_bytes(out_f: int, in_f: int, q: QuantConfig) -> int:
    """Bytes of one Linear stored at its kind's bit width, scales (float32) included; FP = fp16."""
    if not q.quantised:
        return 2 * out_f * in_f
    if q.weight == "int4":
        scales = out_f * -(-in_f // q.group_size)
    else:
        scales = out_f if q.per_channel else 1
    return (WEIGHT_BITS[q.weight] * out_f * in_f + 7) // 8 + 4 * scales


@dataclass(frozen=True)
class LayerSize:
    name: str
    kind: str  # QuantConfig.kind, or "fp"
    params: int
    bytes: int  # ideal packed bytes (ideal_linear_bytes)


def layer_sizes(cfg: ModelConfig) -> list[LayerSize]:
    """Kind and ideal packed bytes of every block Linear, in model order."""
    shapes = cfg.linear_shapes()
    return [LayerSize(n, q.kind, shapes[n][0] * shapes[n][1], ideal_linear_bytes(*shapes[n], q))
            for n, q in cfg.layer_quants().items()]


def kind_summary(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """``{kind: {"layers": n, "params": p, "bytes": b}}`` over the block Linears."""
    out: dict[str, dict[str, int]] = {}
    for s in layer_sizes(cfg):
        e = out.setdefault(s.kind, {"layers": 0, "params": 0, "bytes": 0})
        e["layers"] += 1
        e["params"] += s.params
        e["bytes"] += s.bytes
    return out


@dataclass(frozen=True)
class ModelSizes:
    params: int
    ternary_params: int  # the quantised Linear weights of the blocks (any low-bit kind)
    fp_params: int  # embeddings, LM head, norms, FP Linears: kept in higher precision
    linear_bytes: int  # block Linears at their kinds' bit widths (FP ones in fp16), scales included
    fp_linear_params: int = 0  # block Linears kept in full precision (counted in fp_params)

    @property
    def train_bytes(self) -> int:
        """fp32 weights + grads + two AdamW moments (activations not included)."""
        return 16 * self.params

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.params

    @property
    def packed_bytes(self) -> int:
        """Each block Linear at its kind's bits (ternary 2), fp16 for embeddings, head and norms."""
        return self.linear_bytes + 2 * (self.fp_params - self.fp_linear_params)


def model_sizes(cfg: ModelConfig) -> ModelSizes:
    d, f = cfg.dim, cfg.ffn_dim
    layers = layer_sizes(cfg)
    linear = sum(s.params for s in layers)
    norms = cfg.n_layers * 2 * d + d
    if cfg.qk_norm:
        norms += cfg.n_layers * 2 * cfg.head_dim
    if cfg.sub_norm:
        norms += cfg.n_layers * (d + f)
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    quantised = sum(s.params for s in layers if s.kind != "fp")
    total = linear + norms + emb
    return ModelSizes(total, quantised, total - quantised, sum(s.bytes for s in layers),
                      fp_linear_params=linear - quantised)
