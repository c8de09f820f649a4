"""The start-up heap frozen out of the garbage collector's sight before generating (tritlm.heap)."""

from __future__ import annotations

import gc

import torch

from tritlm.cli import main
from tritlm.data.tokenizer import CharTokenizer
from tritlm.formats.packed import from_transformer, save_packed
from tritlm.heap import freeze_startup_heap
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer


def test_freeze_moves_every_live_object_out_of_the_collectors_sight():
    gc.unfreeze()
    keep = [[i] for i in range(1000)]  # tracked containers alive now
    freeze_startup_heap()
    assert gc.get_freeze_count() >= len(keep)
    assert all(not any(x is k for x in gc.get_objects()) for k in keep[:5])  # frozen: not walked


def test_generate_freezes_once_the_model_is_loaded(tmp_path, capsys):
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz :\n")
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=32)
    path = save_packed(from_transformer(Transformer(cfg).eval(), tok, fp_dtype="fp32"), tmp_path / "m")
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    assert main(["generate", str(path), "--prompt", "king: ", "--max-tokens", "4", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("king: ")
    assert gc.get_freeze_count() > 0
