"""Small random models shared by the runtime tests."""

from __future__ import annotations

import torch

from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer


def tiny_model(max_len: int = 64, ffn_dim: int = 256, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=128, n_layers=2, n_heads=4, ffn_dim=ffn_dim, max_seq_len=max_len, **kw)
    m = Transformer(cfg)
    # Trained models have norm weights away from 1; make the tests see them.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m.eval()
