"""Parameter counts and memory footprints of a config, computed without building the model."""

from __future__ import annotations

from dataclasses import dataclass

from tritlm.model.config import ModelConfig


@dataclass(frozen=True)
class ModelSizes:
    params: int
    ternary_params: int  # the quantised Linear weights of the blocks
    fp_params: int  # embeddings, LM head, norms: kept in higher precision

    @property
    def train_bytes(self) -> int:
        """fp32 weights + grads + two AdamW moments (activations not included)."""
        return 16 * self.params

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.params

    @property
    def packed_bytes(self) -> int:
        """2 bits per ternary weight, fp16 for the rest (per-matrix scales are negligible)."""
        return self.ternary_params // 4 + 2 * self.fp_params


def model_sizes(cfg: ModelConfig) -> ModelSizes:
    d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    mlp = 3 * d * f
    linear = cfg.n_layers * (attn + mlp)
    norms = cfg.n_layers * 2 * d + d
    if cfg.qk_norm:
        norms += cfg.n_layers * 2 * hd
    if cfg.sub_norm:
        norms += cfg.n_layers * (d + f)
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    ternary = linear if cfg.quantised else 0
    total = linear + norms + emb
    return ModelSizes(total, ternary, total - ternary)
