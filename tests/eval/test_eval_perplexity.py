"""``tritlm eval``: the three perplexity protocols against independent implementations (the HF guide's
loop run with transformers, llama-perplexity's chunk loop, llama.cpp's own logits), bits per byte, the
same numbers for a checkpoint, its HF export and its packed folder, and the command line."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import tritlm
from tritlm.cli import main
from tritlm.data.corpus import default_corpus_path, read_corpus
from tritlm.data.tokenizer import ByteTokenizer, HFTokenizer
from tritlm.errors import ConfigError
from tritlm.eval.perplexity import (
    PROTOCOLS,
    evaluate,
    perplexity,
    plan_windows,
    scored_positions,
    token_bytes_decoder,
)
from tritlm.infer.bench_llama_cpp import open_llama
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.quant.config import TERNARY

SHARED = Path("/work/shared/data")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core box: one torch thread is several times faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_sample(n: int = 3000) -> str:
    return read_corpus(default_corpus_path())[:n]


def rand_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- (a) constant logits ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_constant_logits_give_the_vocabulary_size(protocol):
    V = 97

    def flat(x):
        return torch.full((*x.shape, V), 3.5)

    r = perplexity(flat, rand_ids(500, V), protocol=protocol, ctx=32, bos_id=0,
                   decode=lambda ids: "x" * len(ids))
    assert r.ppl == pytest.approx(V, rel=1e-12)
    assert r.nll == pytest.approx(math.log(V), rel=1e-12)
    # one byte per token: bits per byte is log2(V)
    assert r.bytes == r.tokens and r.bits_per_byte == pytest.approx(math.log2(V), rel=1e-12)


# ---- (b) the hf protocol is the HF guide's loop ---------------------------------------------------
def guide_loop(model, input_ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, float]:
    """The loop of Hugging Face's "Perplexity of fixed-length models", run with transformers' own loss:
    (exp of the mean over the tokens each window really scores, exp of the guide's literal weighting
    ``num_valid_tokens - batch_size``, which is one token short for windows after the first when
    stride < max_length)."""
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, guide_sum, guide_n = 0.0, 0, 0.0, 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = float(model(ids, labels=target_ids).loss)  # mean over the shifted valid labels
        scored = int((target_ids[:, 1:] != -100).sum())  # what that mean was taken over
        nll_sum += loss * scored
        n_tokens += scored
        literal = int((target_ids != -100).sum()) - target_ids.size(0)
        guide_sum += loss * literal
        guide_n += literal
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), math.exp(guide_sum / guide_n)


def test_hf_protocol_equals_the_guide_loop_with_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    hm = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hm.lm_head.weight.mul_(8)  # a peaked distribution: context changes the numbers
    ids = torch.tensor([rand_ids(300, 97, seed=1)])

    def logits_fn(x):
        with torch.no_grad():
            return hm(x).logits

    got = {}
    for stride in (16, 64):
        ours = perplexity(logits_fn, ids[0], protocol="hf", ctx=64, stride=stride)
        exact, literal = guide_loop(hm, ids, 64, stride)
        rel = abs(ours.ppl - exact) / exact
        print(f"hf stride {stride}: ours {ours.ppl:.6f}, transformers' loop {exact:.6f} (rel {rel:.1e}); "
              f"the guide's literal num_valid - 1 weighting {literal:.6f}")
        assert rel < 1e-5
        got[stride] = ours
    assert got[16].tokens == 299  # every token but the first, once
    assert got[64].tokens == 300 - 5  # stride = ctx: each window's first token has no context
    assert got[16].windows > got[64].windows
    assert got[16].ppl != pytest.approx(got[64].ppl, rel=1e-3)  # the stride matters for this model
    chunks = perplexity(logits_fn, ids[0], protocol="chunks", ctx=64)
    assert chunks.tokens == 300 - 5 and chunks.stride == 64  # 5 chunks, each first token unscored


# ---- (d) the llama.cpp protocol -------------------------------------------------------------------
def llama_perplexity_loop(logits_fn, tokens: list[int], n_ctx: int, bos: int | None):
    """llama-perplexity's perplexity() (tools/perplexity/perplexity.cpp), written from its loop:
    tokenise with BOS, n_chunk = n / n_ctx, BOS over each chunk's first token, logits of positions
    first = n_ctx/2 .. n_ctx-2 predict the next token. (nll sum, count, target positions)."""
    toks = ([bos] if bos is not None else []) + list(tokens)
    n_chunk = len(toks) // n_ctx
    first = n_ctx // 2
    nll, count, targets = 0.0, 0, []
    for i in range(n_chunk):
        start = i * n_ctx
        chunk = toks[start:start + n_ctx]
        if bos is not None:
            chunk[0] = bos
        logits = np.asarray(logits_fn(torch.tensor([chunk]))[0], dtype=np.float64)
        for j in range(first, n_ctx - 1):
            row = logits[j] - logits[j].max()
            nll += -(row[toks[start + j + 1]] - math.log(np.exp(row).sum()))
            count += 1
            targets.append(start + j + 1)
    return nll, count, targets


@pytest.mark.parametrize(("n", "ctx", "bos"), [(1000, 128, None), (1000, 128, 5), (700, 65, 3), (257, 256, None)])
def test_llama_cpp_protocol_scores_what_llama_perplexity_scores(n, ctx, bos):
    V = 50
    torch.manual_seed(0)
    table = torch.randn(V, V) * 3
    seen = []

    def bigram(x):  # a context-free model is enough to check positions and BOS handling
        seen.append(x.clone())
        return table[x]

    ids = rand_ids(n, V)
    r = perplexity(bigram, ids, protocol="llama.cpp", ctx=ctx, bos_id=bos, decode=lambda t: "a" * len(t))
    nll, count, targets = llama_perplexity_loop(bigram, ids, ctx, bos)
    stream = n + (bos is not None)
    assert scored_positions(plan_windows(stream, "llama.cpp", ctx)) == targets
    assert r.tokens == count == (stream // ctx) * (ctx - ctx // 2 - 1)
    assert r.nll_sum == pytest.approx(nll, rel=1e-12)
    assert r.bytes == r.tokens  # one byte per scored token
    if bos is not None:
        assert all(int(x[0, 0]) == bos for x in seen)


def test_llama_cpp_logits_on_our_gguf_agree():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from tritlm.formats.gguf import export_gguf

    cfg = ModelConfig(vocab_size=257, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=256,
                      quant=TERNARY)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.embed_tokens.weight.mul_(4)  # peaked logits (as in test_formats_gguf): a sharper comparison
        model.lm_head.weight.mul_(4)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = export_gguf(model, ByteTokenizer(), Path(d) / "m.gguf", qtype="TQ2_0")
        ours = tritlm.load(p)  # our forward over our GGUF
        llm = open_llama(p, n_ctx=128, logits_all=True, verbose=False, n_threads=2)

        def theirs(x):
            out = []
            for row in x.tolist():
                llm.reset()
                llm.eval(row)
                out.append(np.asarray(llm.scores[:len(row)], dtype=np.float32))
            return torch.from_numpy(np.stack(out))

        ids = ByteTokenizer().encode(text_sample(1200))
        a = perplexity(ours, ids, protocol="llama.cpp", ctx=128, bos_id=256)
        b = perplexity(theirs, ids, protocol="llama.cpp", ctx=128, bos_id=256, decode=ours.tokenizer.decode)
    rel = abs(a.ppl - b.ppl) / a.ppl
    print(f"llama.cpp protocol, TQ2_0 GGUF: our logits ppl {a.ppl:.4f}, llama.cpp's {b.ppl:.4f} (rel {rel:.1e}); "
          f"bits/byte {a.bits_per_byte:.4f} vs {b.bits_per_byte:.4f}")
    assert a.tokens == b.tokens == (len(ids) + 1) // 128 * 63
    assert rel < 0.01


# ---- bits per byte ---------------------------------------------------------------------------------
def test_bytes_are_the_scored_tokens_bytes():
    text = "the caf\u00e9 sat on the mat; the dog sat on the log.\n" * 30
    tok = HFTokenizer.train_bpe(text, 300)
    ids = tok.encode(text)

    def flat(x):
        return torch.zeros((*x.shape, tok.vocab_size))

    r = perplexity(flat, ids, protocol="hf", ctx=32, stride=8, decode=tok.decode)
    assert r.bytes == len(text.encode()) - len(tok.decode(ids[:1]).encode())  # all but the first token
    assert r.bits_per_byte == pytest.approx(r.nll_sum / math.log(2) / r.bytes)
    c = perplexity(flat, ids, protocol="llama.cpp", ctx=32, decode=tok.decode)
    want = sum(len(tok.decode([ids[p]]).encode()) for p in scored_positions(plan_windows(len(ids), "llama.cpp", 32)))
    assert c.bytes == want  # byte-level BPE: the scored tokens' bytes
    none = perplexity(flat, ids, protocol="chunks", ctx=32)
    assert none.bits_per_byte is None and none.bytes is None
    # run boundaries inside multi-byte characters: the byte tokenizer's bytes are its tokens
    btok = ByteTokenizer()
    bids = btok.encode("h\u00e9llo w\u00f6rld \u2603 \U0001f600 " * 20)
    for protocol in PROTOCOLS:
        r = perplexity(lambda x: torch.zeros((*x.shape, 257)), bids, protocol=protocol, ctx=7,
                       decode=token_bytes_decoder(btok))
        assert r.bytes == r.tokens, protocol
        text_bytes = perplexity(lambda x: torch.zeros((*x.shape, 257)), bids, protocol=protocol, ctx=7,
                                decode=btok.decode).bytes
        if protocol != "hf":  # one run from an ASCII first token for hf; many boundaries for the others
            assert text_bytes != r.tokens, protocol  # text decoding miscounts split characters (U+FFFD)


@pytest.mark.parametrize("name", ["gpt2/tokenizer.json", "mistral-7b-v0.1/tokenizer.model"])
@pytest.mark.parametrize("protocol", ["hf", "llama.cpp"])
def test_bytes_of_real_tokenizers_on_wikitext(name, protocol):
    """Byte-level BPE (GPT-2) and SentencePiece (Mistral): the bytes of the scored runs decoded with
    16 tokens of left context equal those of exact prefix decoding."""
    from tritlm.data.tokenizer_load import load_tokenizer
    from tritlm.eval.perplexity import _runs, scored_bytes

    wiki, tpath = SHARED / "wikitext-2-raw" / "wiki.valid.raw", SHARED / "tokenizers" / name
    if not (wiki.is_file() and tpath.is_file()):
        pytest.skip("shared wikitext / tokenizer files are not here")
    tok = load_tokenizer(tpath)
    text = wiki.read_text(encoding="utf-8")[:30_000]
    ids = tok.encode(text)
    off = 1 if protocol == "llama.cpp" and tok.bos_id is not None else 0
    runs = _runs(plan_windows(len(ids) + off, protocol, 256), off)
    exact = sum(len(tok.decode(ids[:b]).encode()) - len(tok.decode(ids[:a]).encode()) for a, b in runs)
    assert scored_bytes(ids, runs, tok.decode) == exact
    by = token_bytes_decoder(tok)
    assert (by is not None) == name.startswith("gpt2")
    if by is not None:  # byte-level BPE: the exact bytes; the same here (no run splits a character)
        assert by(ids) == text.encode()
        assert scored_bytes(ids, runs, by) == exact
    if protocol == "hf":
        assert exact == len(text.encode()) - len(tok.decode(ids[:1]).encode())


# ---- (c) one model in three formats ----------------------------------------------------------------
@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    """A tiny ternary byte-level model trained for 40 steps, as a training checkpoint, its HF export and
    its packed folder, and a held-out text file (the first 2000 characters of the bundled corpus)."""
    from tritlm.formats.checkpoint import save_checkpoint
    from tritlm.formats.hf import export_hf
    from tritlm.formats.packed import pack_model

    d = tmp_path_factory.mktemp("eval")
    cfg = ModelConfig(vocab_size=257, dim=128, n_layers=2, n_heads=4, ffn_dim=256, max_seq_len=64, quant=TERNARY)
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = Transformer(cfg)
    data = torch.tensor(tok.encode(read_corpus(default_corpus_path())[10_000:200_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):  # a few steps: perplexity well below the vocabulary size
        ix = torch.randint(0, data.numel() - 65, (8,), generator=g)
        x = torch.stack([data[i:i + 65] for i in ix])
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ckpt = save_checkpoint(d / "run" / "checkpoints", 1, model, None, {}, {"model": cfg.to_dict()}, tok)
    hf = export_hf(model, tok, d / "hf")
    packed, _ = pack_model(ckpt, d / "packed")
    text = d / "text.txt"
    text.write_text(text_sample(2000))
    return {"ckpt": d / "run", "hf": hf, "packed": packed, "text": text, "dir": d}


def test_checkpoint_hf_and_packed_give_the_same_perplexity(formats, capsys):
    res = {k: evaluate(formats[k], formats["text"], protocol="hf", stride=16) for k in ("ckpt", "hf", "packed")}
    base = res["ckpt"]
    assert base.tokens == 1999 and base.bytes == 1999 and base.ctx == 64 and base.stride == 16
    assert base.bits_per_byte == pytest.approx(base.nll / math.log(2))  # byte tokens: one byte each
    assert res["hf"].ppl == pytest.approx(base.ppl, rel=1e-4)
    assert res["packed"].ppl == pytest.approx(base.ppl, rel=0.01)
    assert base.ppl < 40  # the model learned something (uniform: 257)
    # the command line gives the library's numbers
    capsys.readouterr()
    for k in ("ckpt", "hf"):
        assert main(["eval", str(formats[k]), "--data", str(formats["text"]), "--stride", "16", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["ppl"] == pytest.approx(res[k].ppl, rel=1e-9)
        assert {"ppl", "nll", "tokens", "bits_per_byte", "bytes", "protocol", "ctx", "stride"} <= set(out)
    print("hf protocol, ctx 64, stride 16: " + ", ".join(f"{k} ppl {v.ppl:.5f}" for k, v in res.items())
          + f"; bits/byte {base.bits_per_byte:.4f}")


def test_tokenized_folder_uses_its_val_split(formats):
    from tritlm.data.loader import TokenData
    from tritlm.data.prepare import prepare_dataset

    ds = formats["dir"] / "ds"
    prepare_dataset(formats["text"], ds, tokenizer="byte", val_fraction=0.5)
    m = tritlm.load(formats["ckpt"])
    r = evaluate(m, ds, protocol="chunks")
    val = np.asarray(TokenData(ds).array("val"), dtype=np.int64)
    assert r.ppl == pytest.approx(perplexity(m, val, protocol="chunks").ppl, rel=1e-12)
    other = formats["dir"] / "ds-char"
    prepare_dataset(formats["text"], other, tokenizer="char", val_fraction=0.5)
    with pytest.raises(tritlm.errors.FormatError, match="different tokenizer"):
        evaluate(m, other)


def test_wikitext_bits_per_byte(formats):
    wiki = SHARED / "wikitext-2-raw" / "wiki.valid.raw"
    if not wiki.is_file():
        pytest.skip(f"{wiki} is not here")
    m = tritlm.load(formats["ckpt"])
    r = evaluate(m, wiki, protocol="llama.cpp", max_tokens=1024)
    assert r.tokens == 16 * 31 and r.bytes == r.tokens  # byte tokens
    assert r.bits_per_byte == pytest.approx(r.nll / math.log(2))


# ---- (e) the command line --------------------------------------------------------------------------
def test_cli_text_output_and_protocols(formats, capsys):
    capsys.readouterr()
    assert main(["eval", str(formats["ckpt"]), "--data", str(formats["text"]), "--protocol", "llama.cpp",
                 "--ctx", "32", "--max-tokens", "640", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "llama.cpp" in out and "bits/byte" in out
    assert main(["eval", str(formats["ckpt"]), "--data", str(formats["text"]), "--protocol", "chunks", "--json",
                 "--max-tokens", "500"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["tokens"] == 500 - 8 and j["protocol"] == "chunks" and j["stride"] == 64


def _one_line_error(capsys, argv, match):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tritlm: error:") and "\n" not in err, err
    assert match in err, err


def test_cli_bad_input_gives_one_line_errors(formats, capsys, tmp_path):
    ck, text = str(formats["ckpt"]), str(formats["text"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n ")
    cases = [
        (["eval", ck, "--data", str(tmp_path / "missing.txt")], "no such file"),
        (["eval", str(tmp_path / "nomodel"), "--data", text], "no such file"),
        (["eval", ck, "--data", text, "--ctx", "1"], "at least 2"),
        (["eval", ck, "--data", text, "--ctx", "65"], "longer than the model's context of 64"),
        (["eval", ck, "--data", text, "--ctx", "32", "--stride", "33"], "larger than ctx"),
        (["eval", ck, "--data", text, "--stride", "0"], "at least 1"),
        (["eval", ck, "--data", text, "--protocol", "chunks", "--stride", "8"], "hf protocol"),
        (["eval", ck, "--data", str(empty)], "empty"),
        (["eval", ck, "--data", str(blank)], "no text"),
        (["eval", ck, "--data", text, "--protocol", "llama.cpp", "--max-tokens", "40"], "too few"),
        (["eval", ck], "--data"),
        (["eval", ck, "--data", text, "--limit", "3"], "--tasks"),
    ]
    for argv, match in cases:
        _one_line_error(capsys, argv, match)


def test_cli_tasks(formats, capsys, monkeypatch):
    ck = str(formats["ckpt"])
    monkeypatch.setitem(sys.modules, "tritlm.eval.lm_eval", None)  # the module (or its extra) missing
    _one_line_error(capsys, ["eval", ck, "--tasks", "hellaswag"], "pip install 'tritlm[eval]'")
    calls = []
    fake = types.ModuleType("tritlm.eval.lm_eval")

    def run_tasks(path, tasks, include_path=None, limit=None, batch_size=1):
        calls.append((path, tasks, include_path, limit, batch_size))
        return {"results": {t: {"acc,none": 0.25} for t in tasks}}

    fake.run_tasks = run_tasks
    monkeypatch.setitem(sys.modules, "tritlm.eval.lm_eval", fake)
    capsys.readouterr()
    assert main(["eval", ck, "--tasks", "a,b", "--include-path", "tasks", "--limit", "5"]) == 0
    assert json.loads(capsys.readouterr().out) == {"results": {"a": {"acc,none": 0.25}, "b": {"acc,none": 0.25}}}
    assert calls == [(ck, ["a", "b"], "tasks", 5, 1)]
    assert main(["eval", ck, "--tasks", "a", "--data", str(formats["text"]), "--json", "--max-tokens", "200"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert "ppl" in both and both["tasks"]["results"]["a"]["acc,none"] == 0.25


def test_library_errors():
    with pytest.raises(ConfigError, match="ctx is required"):
        perplexity(lambda x: x, [1, 2, 3])
    with pytest.raises(ConfigError, match="unknown protocol"):
        perplexity(lambda x: x, [1, 2, 3], ctx=4, protocol="wiki")
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        perplexity(lambda x: x, [1], ctx=4)
