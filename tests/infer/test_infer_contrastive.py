"""Contrastive search: the engine's incremental version (candidates at one cached position) against
a from-scratch recomputation over full forwards, and through the API and the CLI."""

from __future__ import annotations

import torch

import tritlm
from tritlm.cli import main
from tritlm.data.tokenizer import CharTokenizer
from tritlm.formats.packed import from_transformer, save_packed
from tritlm.infer.contrastive import contrastive_generate
from tritlm.infer.engine import Engine
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz :\n")


def _pm():
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=TOK.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)
    return from_transformer(Transformer(cfg).eval(), TOK, fp_dtype="fp32")


def _reference(pm, prompt: list[int], n: int, k: int, alpha: float) -> list[int]:
    """Every step from scratch: full forwards of the context and of each candidate continuation."""
    eng, ids = Engine(pm, fused=False), list(prompt)
    for _ in range(n):
        probs = eng.logits(ids)[-1].softmax(-1)
        ctx = eng.last_hidden.clone()  # [T, D]: every context position
        top = torch.topk(probs, k)
        scores = []
        for p, v in zip(top.values.tolist(), top.indices.tolist()):
            eng.logits(ids + [v])
            h = eng.last_hidden[-1]
            sim = torch.nn.functional.cosine_similarity(ctx, h.view(1, -1), dim=-1).max()
            scores.append((1 - alpha) * p - alpha * float(sim))
        ids.append(int(top.indices[max(range(k), key=scores.__getitem__)]))
    return ids[len(prompt):]


def test_contrastive_matches_a_from_scratch_recomputation():
    pm = _pm()
    prompt = TOK.encode("king: ")
    got = list(contrastive_generate(Engine(pm), prompt, 20, k=3, alpha=0.6))
    assert got == _reference(pm, prompt, 20, 3, 0.6)
    assert got != list(contrastive_generate(Engine(pm), prompt, 20, k=3, alpha=0.0))  # alpha matters


def test_contrastive_through_the_api_and_cli(tmp_path, capsys):
    path = save_packed(_pm(), tmp_path / "m")
    m = tritlm.load(path)
    text = m.generate("king: ", 20, penalty_alpha=0.6, top_k=3, stop=["zz"])
    assert text == TOK.decode(_reference(_pm(), TOK.encode("king: "), 20, 3, 0.6)).split("zz")[0]
    assert main(["generate", str(path), "--prompt", "king: ", "--max-tokens", "20", "--penalty-alpha", "0.6",
                 "--top-k", "3", "--stop", "zz"]) == 0
    assert capsys.readouterr().out == "king: " + text + "\n"
    assert main(["generate", str(path), "--prompt", "king: ", "--penalty-alpha", "0.6", "--top-k", "1"]) == 2
    assert "top_k >= 2" in capsys.readouterr().err
