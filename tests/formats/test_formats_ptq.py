"""Post-training quantisation: absmean levels, BitLinear layers, perplexity before/after on held-out text."""

from __future__ import annotations

import logging

import pytest
import torch

from tritlm.data.corpus import default_corpus_path, read_corpus
from tritlm.data.tokenizer import CharTokenizer
from tritlm.eval.perplexity import perplexity
from tritlm.formats.common import block_linears, quantised_linear
from tritlm.formats.ptq import ptq_report, quantize_model
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.nn.bitlinear import BitLinear
from tritlm.quant import absmean_ternary
from tritlm.quant.config import FP


@pytest.fixture(scope="module")
def trained():
    """A tiny FP char model trained briefly on Tiny Shakespeare (so perplexity means something)."""
    text = read_corpus(default_corpus_path())
    tok = CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text[:200_000]))
    held_out = text[-20_000:]
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core box: one thread is faster
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, ffn_dim=172,
                                max_seq_len=64, quant=FP))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        ix = torch.randint(0, ids.numel() - 65, (16,), generator=g)
        x = torch.stack([ids[i:i + 65] for i in ix])
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    yield m.eval(), tok, held_out
    torch.set_num_threads(threads)


def test_quantize_model_uses_absmean(trained, caplog):
    m, _, _ = trained
    with caplog.at_level(logging.WARNING):
        q = quantize_model(m, "ternary")
    assert "loses a lot" in caplog.text
    assert isinstance(q.layers[0].mlp.up_proj, BitLinear) and q.cfg.quantised
    for n in block_linears(m.cfg):
        lv, s = absmean_ternary(m.get_submodule(n).weight.detach().float())
        q2, s2 = quantised_linear(q, n)
        assert torch.equal(q2, lv.to(torch.int8)) and s2 == pytest.approx(float(s))
    b = quantize_model(m, "binary")
    assert set(quantised_linear(b, block_linears(m.cfg)[0])[0].unique().tolist()) <= {-1, 1}


def test_perplexity_before_after(trained):
    m, tok, held_out = trained
    rep = {bits: ptq_report(m, tok, held_out, bits, max_windows=12) for bits in ("ternary", "binary")}
    fp = rep["ternary"]["ppl_fp"]
    assert fp < 30  # the model learned something (a uniform guess is ~65)
    for bits, r in rep.items():
        print(f"PTQ {bits}: ppl {r['ppl_fp']:.2f} -> {r['ppl_quant']:.2f} (x{r['ratio']:.2f})")
        assert r["ppl_quant"] > fp and torch.isfinite(torch.tensor(r["ppl_quant"]))
    assert perplexity(m, tok.encode(held_out[:500])).ppl == pytest.approx(
        perplexity(m, tok.encode(held_out[:500])).ppl)
