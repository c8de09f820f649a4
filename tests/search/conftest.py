"""A tiny FP model with exactly 4 search units (1 layer, ``--units qkv``: qkv, o_proj, gate_up,
down_proj), trained briefly so that quantising a unit changes its loss, plus calibration ids."""

from __future__ import annotations

import pytest
import torch

from tritlm.data.corpus import default_corpus_path, read_corpus
from tritlm.data.tokenizer import CharTokenizer
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.quant.config import FP

CTX = 64


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer, calibration ids, held-out ids, corpus text)."""
    text = read_corpus(default_corpus_path())
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text[:150_000]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core box: one thread is faster
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=2, ffn_dim=128,
                                max_seq_len=CTX, quant=FP))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        ix = torch.randint(0, ids.numel() - CTX - 1, (16,), generator=g)
        x = torch.stack([ids[i:i + CTX + 1] for i in ix])
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    m = m.eval().requires_grad_(False)
    calib = torch.tensor(tok.encode(text[-40_000:-39_000]))
    held = torch.tensor(tok.encode(text[-20_000:-18_000]))
    yield m, tok, calib, held, text
    torch.set_num_threads(threads)
