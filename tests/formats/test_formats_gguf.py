"""GGUF: export -> import round trips (TQ2_0, TQ1_0, I2_S, F16 fallback), independent reading with the
``gguf`` package, inspect/validate/repair, bad input, and llama.cpp agreement (about a second; skipped without
llama-cpp-python, which ``scripts/setup_llama_cpp.sh`` builds). Mixed models: test_formats_gguf_mixed.py."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fuzzing import fuzz_single_file  # noqa: E402  (tests/formats helper)

from tritlm.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer  # noqa: E402
from tritlm.errors import FormatError  # noqa: E402
from tritlm.formats.common import block_linears, quantised_linear, rel_error, set_quantised  # noqa: E402
from tritlm.formats.gguf import (  # noqa: E402
    _permute,
    _unpermute,
    export_gguf,
    export_gguf_packed,
    import_gguf,
    pack_i2s,
    unpack_i2s,
)
from tritlm.formats.gguf_io import read_gguf  # noqa: E402
from tritlm.formats.gguf_tools import inspect_gguf, repair_gguf, validate_gguf  # noqa: E402
from tritlm.infer.bench_llama_cpp import open_llama
from tritlm.model.config import ModelConfig, quant_overrides_from  # noqa: E402
from tritlm.model.transformer import Transformer  # noqa: E402
from tritlm.quant.config import BINARY, FP, TERNARY  # noqa: E402


def cfg_for(sub_norm: bool, **kw) -> ModelConfig:
    base = dict(vocab_size=257, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=64,
                mlp="relu2" if sub_norm else "swiglu", sub_norm=sub_norm, tie_embeddings=sub_norm, quant=TERNARY)
    base.update(kw)
    return ModelConfig(**base)


def make(cfg, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def logits(m, ids):
    with torch.no_grad():
        return m(ids)[0][0]


def reference_with_scales(model, fp16: bool):
    """The source model with each scale rounded as the file stores it (fp16 in TQ blocks)."""
    ref = make(model.cfg)
    ref.load_state_dict(model.state_dict())
    for n in block_linears(model.cfg):
        q, s = quantised_linear(model, n)
        set_quantised(ref, n, q, float(np.float16(s)) if fp16 else float(np.float32(s)))
    return ref.eval()


@pytest.mark.parametrize(("qtype", "sub_norm"), [("TQ2_0", False), ("TQ1_0", True), ("I2_S", True)])
def test_round_trip(tmp_path, qtype, sub_norm):
    model = make(cfg_for(sub_norm, n_layers=1))
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf", qtype=qtype)
    back, tok = import_gguf(p)
    assert back.cfg == model.cfg and tok.fingerprint() == ByteTokenizer().fingerprint()
    for n in block_linears(model.cfg):
        (q1, s1), (q2, s2) = quantised_linear(model, n), quantised_linear(back, n)
        assert torch.equal(q1, q2), n  # identical ternary levels (q/k un-permuted)
        assert s2 == pytest.approx(float(np.float16(s1)) if qtype != "I2_S" else s1, rel=1e-6)
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    ref = reference_with_scales(model, fp16=qtype != "I2_S")
    assert rel_error(logits(back, ids), logits(ref, ids)) < 1e-5
    # and against the unrounded source: only the fp16 scale rounding differs
    assert rel_error(logits(back, ids), logits(model, ids)) < 5e-2


def test_gguf_package_reads_our_file_and_agrees(tmp_path):
    model = make(cfg_for(False))
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf", qtype="TQ2_0")
    r = gguf.GGUFReader(str(p))
    assert str(r.fields["general.architecture"].contents()) == "llama"
    t = {x.name: x for x in r.tensors}["blk.0.ffn_up.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.TQ2_0
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    q, s = quantised_linear(model, "layers.0.mlp.up_proj")
    np.testing.assert_array_equal(w, q.numpy().astype(np.float32) * np.float16(s).astype(np.float32))
    tq = {x.name: x for x in r.tensors}["blk.0.attn_q.weight"]
    wq = gguf.quants.dequantize(tq.data, tq.tensor_type)
    q, _ = quantised_linear(model, "layers.0.self_attn.q_proj")
    np.testing.assert_array_equal(np.sign(wq), _permute(q.numpy(), 4))


@pytest.mark.parametrize("mixed", [False, True], ids=["ternary", "mixed"])
def test_export_from_packed_model_is_the_same_file(tmp_path, mixed):
    """The packed route (no float model) writes the same tensors as the training-model route, for a
    ternary model and for a mixed one (TQ2_0 + Q8_0 + Q4_0 + F16 block Linears, per-row scales)."""
    from tritlm.formats.packed import from_transformer

    cfg = cfg_for(False, tie_embeddings=False)
    if mixed:
        cfg = cfg.replace(quant_overrides=quant_overrides_from(
            {"layers.0.self_attn.q_proj": "int8", "layers.*.self_attn.k_proj": {"weight": "int4", "group_size": 32},
             "layers.1.self_attn.*": {"weight": "ternary", "scale": "channel"}, "layers.0.mlp.down_proj": "fp",
             "layers.1.mlp.*": {"weight": "binary", "scale": "channel"}}, cfg.quant))
    model = make(cfg)
    a = export_gguf(model, ByteTokenizer(), tmp_path / "a.gguf", fp_type="F16", head_type="Q8_0")
    b = export_gguf_packed(from_transformer(model, ByteTokenizer(), fp_dtype="fp32"), tmp_path / "b.gguf",
                           fp_type="F16", head_type="Q8_0")
    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data), err_msg=name)
    if mixed:
        assert {t.tensor_type for t in ta.values()} >= {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0,
                                                        gguf.GGMLQuantizationType.TQ2_0}
        assert ta["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    head = ta["output.weight"]
    assert head.tensor_type == gguf.GGMLQuantizationType.Q8_0
    # Q8_0: 32 weights share one scale d = max|w| / 127 stored as fp16 -> error <= d / 2 + 127 * d * 2^-11
    w = model.lm_head.weight.detach().numpy()
    back, _ = import_gguf(b)
    err = np.abs(back.lm_head.weight.detach().numpy() - w).reshape(w.shape[0], -1, 32)
    assert (err <= np.abs(w).reshape(err.shape).max(-1, keepdims=True) / 127 * 0.57).all()
    assert err.max() > 0  # it is quantised, not stored as float
    with pytest.raises(FormatError, match="Q6_K"):
        export_gguf(model, ByteTokenizer(), tmp_path / "c.gguf", head_type="Q6_K")
    # Q4_0 (the q4 head's peer in tritlm bench): d = the block's signed absmax / -8, 4-bit levels
    c = export_gguf_packed(from_transformer(model, ByteTokenizer(), fp_dtype="fp32"), tmp_path / "q4.gguf",
                           fp_type="F16", head_type="Q4_0")
    assert {t.name: t for t in gguf.GGUFReader(str(c)).tensors}["output.weight"].tensor_type == \
        gguf.GGMLQuantizationType.Q4_0
    back4, _ = import_gguf(c)
    err = np.abs(back4.lm_head.weight.detach().numpy() - w).reshape(w.shape[0], -1, 32)
    # (a value near -max maps past level 7 and is clipped to it: up to one step d = max / 8)
    assert (err <= np.abs(w).reshape(err.shape).max(-1, keepdims=True) / 8 * 1.01).all() and err.max() > 0


def test_permute_inverse_and_i2s_layout():
    w = np.arange(32 * 3).reshape(32, 3)
    np.testing.assert_array_equal(_unpermute(_permute(w, 4), 4), w)
    q = np.random.default_rng(0).integers(-1, 2, size=(4, 128)).astype(np.int8)
    raw = np.frombuffer(pack_i2s(q, 0.25), dtype=np.uint8)
    assert raw.size == 4 * 128 // 4 + 32
    # bitnet.cpp: weight j of a 128-block sits in byte j % 32, bits (6 - 2 * (j // 32))
    assert (raw[0] >> 6) & 3 == q[0, 0] + 1 and (raw[0] >> 4) & 3 == q[0, 32] + 1 and raw[0] & 3 == q[0, 96] + 1
    back, s = unpack_i2s(raw, q.size)
    np.testing.assert_array_equal(back.reshape(q.shape), q)
    assert s == 0.25


def test_f16_fallback_for_rows_not_multiple_of_256(tmp_path):
    model = make(cfg_for(False, ffn_dim=320))  # down_proj has K = 320
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf")
    info = inspect_gguf(p)
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "TQ2_0"
    assert info["metadata"]["tritlm.fallback_f16"] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    back, _ = import_gguf(p)
    for n in block_linears(model.cfg):
        assert torch.equal(quantised_linear(model, n)[0], quantised_linear(back, n)[0])


def test_binary_fp_and_tokenizers(tmp_path):
    m = make(cfg_for(True, quant=BINARY))
    back, _ = import_gguf(export_gguf(m, None, tmp_path / "b.gguf", qtype="TQ1_0"))
    assert back.cfg.quant == BINARY
    fp = make(cfg_for(False, quant=FP))
    with pytest.raises(FormatError, match="quantise it first"):
        export_gguf(fp, None, tmp_path / "x.gguf", qtype="TQ2_0")
    back, _ = import_gguf(export_gguf(fp, None, tmp_path / "f.gguf", qtype="F32"))
    ids = torch.arange(20)[None]
    assert rel_error(logits(back, ids), logits(fp, ids)) < 1e-6
    text = "to be or not to be, that is the question\n" * 20
    for tok in (CharTokenizer.from_text(text), HFTokenizer.train_bpe(text, 300)):
        m = make(cfg_for(False, vocab_size=max(tok.vocab_size, 64)))
        p = export_gguf(m, tok, tmp_path / f"{tok.kind}.gguf")
        _, back_tok = import_gguf(p)
        assert back_tok.fingerprint() == tok.fingerprint()
        kv = read_gguf(p).kv
        assert kv["tokenizer.ggml.model"] == "gpt2" and len(kv["tokenizer.ggml.tokens"]) == m.cfg.vocab_size


def test_inspect_and_validate(tmp_path):
    p = export_gguf(make(cfg_for(True, mlp="swiglu")), ByteTokenizer(), tmp_path / "m.gguf", qtype="TQ2_0")
    info = inspect_gguf(p)
    assert info["version"] == 3 and info["metadata"]["general.architecture"] == "bitnet"
    assert info["by_type"]["TQ2_0"]["bits_per_weight"] == pytest.approx(66 * 8 / 256)
    rep = validate_gguf(p)
    assert rep["ok"], rep
    assert any("forward pass" in c for c in rep["checks"])


def _write_old_misaligned(src, dst):
    """The same content as a GGUF v2 file with tensors packed back to back (no alignment)."""
    f = read_gguf(src)
    from tritlm.formats.gguf_io import _pack_value

    kv = {k: v for k, v in f.kv.items() if k != "general.alignment"}
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 2, len(f.tensors), len(kv)))
    for k, v in kv.items():
        vt, payload = _pack_value(v, f.kv_types[k])
        out += _pack_value(k, 8)[1] + struct.pack("<I", vt) + payload
    off, blobs = 0, []
    for t in f.tensors:
        out += _pack_value(t.name, 8)[1] + struct.pack("<I", len(t.shape)) + struct.pack(f"<{len(t.shape)}Q", *t.shape)
        out += struct.pack("<IQ", t.ttype, off)
        blobs.append(f.tensor_bytes(t).tobytes())
        off += len(blobs[-1]) + 2  # deliberately misaligned
        blobs.append(b"\0\0")
    out += b"\0" * (-len(out) % 32)
    dst.write_bytes(bytes(out) + b"".join(blobs))


def test_repair_old_misaligned_file(tmp_path):
    model = make(cfg_for(False))
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf")
    bad = tmp_path / "old.gguf"
    _write_old_misaligned(p, bad)
    with pytest.raises(FormatError, match="alignment"):
        import_gguf(bad)
    rep = validate_gguf(bad)
    # misalignment fails validation; v2 itself is a valid, older version (noted, not failed)
    assert not rep["ok"] and any("alignment" in x for x in rep["problems"])
    assert any("v2" in x for x in rep["checks"]) and not any("version" in x for x in rep["problems"])
    res = repair_gguf(bad, tmp_path / "fixed.gguf")
    assert res["fixed"]
    assert validate_gguf(tmp_path / "fixed.gguf")["ok"]
    back, _ = import_gguf(tmp_path / "fixed.gguf")
    for n in block_linears(model.cfg):
        assert torch.equal(quantised_linear(model, n)[0], quantised_linear(back, n)[0])


def test_bad_files_give_one_line_errors(tmp_path):
    p = export_gguf(make(cfg_for(False)), ByteTokenizer(), tmp_path / "m.gguf")
    data = p.read_bytes()
    cases = {"trunc": data[: len(data) // 2], "head": data[:10], "magic": b"GGUX" + data[4:], "empty": b"",
             "version": data[:4] + struct.pack("<I", 9) + data[8:]}
    for name, blob in cases.items():
        f = tmp_path / f"{name}.gguf"
        f.write_bytes(blob)
        with pytest.raises(FormatError) as e:
            import_gguf(f)
        assert "\n" not in str(e.value)
    wrong = tmp_path / "arch.gguf"
    wrong.write_bytes(data.replace(b"llama", b"gpt2x", 1))
    with pytest.raises(FormatError, match="architecture"):
        import_gguf(wrong)


def test_export_is_atomic(tmp_path, monkeypatch):
    import tritlm.formats.gguf as g

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(g, "write_gguf", boom)
    with pytest.raises(RuntimeError):
        export_gguf(make(cfg_for(False)), None, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_fuzz_loader(tmp_path):
    """Mutated real files: every outcome is a model or a FormatError, never another exception."""
    small = make(ModelConfig(vocab_size=16, dim=256, n_layers=1, n_heads=2, ffn_dim=256, max_seq_len=16,
                             quant=TERNARY))
    src = export_gguf(small, None, tmp_path / "s.gguf").read_bytes()
    header = read_gguf(tmp_path / "s.gguf").data_offset  # metadata + tensor table: where parsing happens
    tried = fuzz_single_file(src, header, tmp_path / "f.gguf", import_gguf, truncate_below=64)
    print(f"gguf fuzz: {tried}")


@pytest.mark.parametrize(("sub_norm", "qtype", "tie"), [(False, "TQ2_0", False), (False, "TQ1_0", True),
                                                       (True, "TQ2_0", True)])
def test_llama_cpp_agrees_with_our_forward(tmp_path, sub_norm, qtype, tie):
    pytest.importorskip("llama_cpp")
    # llama arch (q/k permuted) and bitnet arch (SiLU-gated, SubLN, tied); embeddings scaled up from
    # the random init so that the next-token distribution is peaked and top-1 is meaningful.
    cfg = cfg_for(sub_norm, n_layers=2, max_seq_len=512, mlp="swiglu", tie_embeddings=tie)
    model = make(cfg)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(20)
        if not tie:
            model.lm_head.weight.mul_(20)
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf", qtype=qtype)
    ref = reference_with_scales(model, fp16=True)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = open_llama(p, n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    ours = logits(ref, torch.tensor([ids])).numpy()
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    rel = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    print(f"llama.cpp {qtype} sub_norm={sub_norm}: top-1 agreement over {len(ids)} positions {agree:.3f}, "
          f"max rel logit error {rel:.2e}")
    assert agree >= 0.95


def test_relu2_subln_is_written_for_bitnet_cpp(tmp_path):
    model = make(cfg_for(True, n_layers=1))
    p = export_gguf(model, None, tmp_path / "m.gguf", qtype="I2_S")
    assert read_gguf(p).kv["general.architecture"] == "bitnet-b1.58"
    back, _ = import_gguf(p)
    assert back.cfg.mlp == "relu2"


def test_llama_cpp_tokenizes_like_us(tmp_path):
    """The vocabulary metadata: llama.cpp encodes and decodes exactly as our tokenizers do."""
    pytest.importorskip("llama_cpp")
    bpe_text = "the cat sat on the mat, the dog sat on the log\n" * 40
    cases = [(ByteTokenizer(), "Hello, world!\n  h\u00e9llo x"),
             (CharTokenizer.from_text("Hello, world!\n xabc"), "Hello, world!\n xabc"),  # ASCII only (docs)
             (HFTokenizer.train_bpe(bpe_text, 280), "the cat sat on the log\n the mat")]
    for tok, text in cases:
        m = make(cfg_for(False, vocab_size=max(tok.vocab_size, 64), n_layers=1))
        p = export_gguf(m, tok, tmp_path / f"{tok.kind}.gguf")
        llm = open_llama(p, n_ctx=64, verbose=False, vocab_only=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), tok.kind
        assert llm.detokenize(tok.encode(text)).decode() == text, tok.kind
