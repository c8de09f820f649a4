"""GGUF for mixed models (a kind per block Linear): the block encoders against ggml's layout, per-tensor
types (TQ / Q8_0 / Q4_0 / F16), exact round trips of every kind, F16 fallback, foreign per-block
scales, inspect/validate, the HF refusal, and llama.cpp agreement (skipped without llama-cpp-python).
The packed route (same file) is test_formats_gguf.py::test_export_from_packed_model_is_the_same_file."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tritlm.data.tokenizer import ByteTokenizer  # noqa: E402
from tritlm.errors import FormatError  # noqa: E402
from tritlm.formats.common import block_linears, rel_error  # noqa: E402
from tritlm.formats.gguf import _model_layers, export_gguf, gguf_name, import_gguf, pack_blocks  # noqa: E402
from tritlm.formats.gguf_io import Q4_0, Q8_0, TQ1_0, TQ2_0, read_gguf, write_gguf  # noqa: E402
from tritlm.formats.gguf_tools import inspect_gguf, validate_gguf  # noqa: E402
from tritlm.infer.bench_llama_cpp import open_llama
from tritlm.model.config import ModelConfig, quant_overrides_from  # noqa: E402
from tritlm.model.transformer import Transformer  # noqa: E402
from tritlm.quant.config import TERNARY  # noqa: E402

# every kind, with per-row and per-group scales on the permuted q/k rows of the llama arch
MIXED = {"layers.0.self_attn.q_proj": "int8", "layers.0.self_attn.k_proj": {"weight": "int4", "group_size": 64},
         "layers.*.self_attn.v_proj": {"weight": "ternary", "scale": "channel"},
         "layers.1.self_attn.*": {"weight": "binary", "scale": "channel"},
         "layers.1.mlp.*": {"weight": "int4", "group_size": 128}, "layers.0.mlp.down_proj": "fp",
         "layers.0.mlp.gate_proj": "binary"}
# the brief's model for the llama.cpp check
SPEC = {"layers.*.self_attn.*": "int8", "layers.1.mlp.*": {"weight": "int4", "group_size": 32},
        "layers.0.mlp.down_proj": "fp"}
GGUF_TYPE = {"ternary": "TQ2_0", "ternary-ch": "TQ2_0", "binary": "TQ2_0", "binary-ch": "TQ2_0", "int8": "Q8_0",
             "int4-g32": "Q4_0", "int4-g64": "Q4_0", "int4-g128": "Q4_0", "fp": "F16"}


def mixed_cfg(spec=MIXED, **kw) -> ModelConfig:
    base = dict(vocab_size=257, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=256,
                mlp="swiglu", sub_norm=False, tie_embeddings=False, quant=TERNARY)
    base.update(kw)
    cfg = ModelConfig(**base)
    return cfg.replace(quant_overrides=quant_overrides_from(spec, cfg.quant))


def make(cfg, seed=0, peaked=False):
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    if peaked:  # as test_llama_cpp_agrees_with_our_forward: a peaked next-token distribution
        with torch.no_grad():
            m.embed_tokens.weight.mul_(20)
            if not cfg.tie_embeddings:
                m.lm_head.weight.mul_(20)
    return m


def logits(m, ids):
    with torch.no_grad():
        return m(ids)[0][0]


def layers(model):
    return {n: (kind, lv, s, g) for n, kind, lv, s, g in _model_layers(model)}


def f16(x):
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


# ---- block encoders ---------------------------------------------------------------------------
@pytest.mark.parametrize("ttype", [TQ2_0, TQ1_0, Q8_0, Q4_0])
def test_block_encoders_match_ggml(ttype):
    """Our bytes decode with gguf's dequantiser to exactly levels x fp16(d); where ggml's own
    quantiser finds the same d (TQ: d = max|w| of a non-zero block; Q8_0: a block holding +-127) the
    bytes are identical to its output."""
    rng = np.random.default_rng(0)
    bs = 256 if ttype in (TQ2_0, TQ1_0) else 32
    n, k = 6, 2 * 256
    top = {TQ2_0: 1, TQ1_0: 1, Q8_0: 127, Q4_0: 7}[ttype]
    lv = rng.integers(-top, top + 1, size=(n, k)).astype(np.int8)
    lv[:, ::bs] = top  # every block holds its extreme level
    d = f16(rng.uniform(1e-3, 1e-1, size=(n, k // bs)))
    raw = np.frombuffer(pack_blocks(lv, d, ttype), dtype=np.uint8)
    gt = gguf.GGMLQuantizationType(ttype)
    w = lv.astype(np.float32) * np.repeat(d, bs, axis=1)
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, gt).reshape(n, k), w)
    if ttype != Q4_0:  # ggml's Q4_0 quantiser picks d = max / -8 (levels -8..7): a different d
        np.testing.assert_array_equal(raw, np.asarray(gguf.quants.quantize(w, gt)).reshape(-1))


# ---- round trips ------------------------------------------------------------------------------
def test_mixed_round_trip_every_kind_exact(tmp_path):
    model = make(mixed_cfg())
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf", fp_type="F16")
    info = inspect_gguf(p)
    types = {t["name"]: t["type"] for t in info["tensors"]}
    cfg = model.cfg
    for n, q in cfg.layer_quants().items():
        assert types[gguf_name(n + ".weight")] == GGUF_TYPE[q.kind], n
    assert info["linear_kinds"] == {"ternary": {"TQ2_0": 2}, "int8": {"Q8_0": 1}, "int4-g64": {"Q4_0": 1},
                                    "ternary-ch": {"TQ2_0": 2}, "binary-ch": {"TQ2_0": 3},
                                    "int4-g128": {"Q4_0": 3}, "fp": {"F16": 1}, "binary": {"TQ2_0": 1}}
    assert info["metadata"]["general.file_type"] == 37  # TQ2_0 (the ternary layers' type)
    back, _ = import_gguf(p)
    assert back.cfg == cfg  # every layer keeps its kind
    src, got = layers(model), layers(back)
    for n, (kind, lv, s, g) in src.items():
        k2, lv2, s2, g2 = got[n]
        assert (k2, g2) == (kind, g), n
        if kind == "fp":
            np.testing.assert_array_equal(lv2, lv.astype(np.float16).astype(np.float32), err_msg=n)
            continue
        np.testing.assert_array_equal(lv2, lv, err_msg=n)  # identical levels (q/k rows un-permuted)
        want = f16(s)
        if kind == "int4":
            want = np.where(np.abs(lv).reshape(lv.shape[0], -1, g).max(-1) == 0, s2, want)  # empty groups: any d
        np.testing.assert_allclose(s2, want, rtol=1e-6, err_msg=n)  # the scale exactly, rounded to fp16
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    assert rel_error(logits(back, ids), logits(model, ids)) < 2e-2  # fp16 scales (and F16 fp layer) only
    # a second round trip is bit-identical
    p2 = export_gguf(back, ByteTokenizer(), tmp_path / "m2.gguf", fp_type="F16")
    ta, tb = read_gguf(p), read_gguf(p2)
    for a, b in zip(ta.tensors, tb.tensors, strict=True):
        assert (a.name, a.ttype) == (b.name, b.ttype)
        np.testing.assert_array_equal(ta.tensor_bytes(a), tb.tensor_bytes(b), err_msg=a.name)
    rep = validate_gguf(p)
    assert rep["ok"], rep


def test_f16_fallback_per_tensor_for_q8_q4(tmp_path):
    """Rows not a multiple of 32 (K = 80) cannot be Q8_0/Q4_0 blocks: that tensor alone is F16, and
    still loads back as its kind with identical levels."""
    cfg = mixed_cfg({"layers.0.mlp.down_proj": "int8", "layers.1.mlp.down_proj": {"weight": "int4", "group_size": 32},
                     "layers.*.mlp.up_proj": "int8"}, ffn_dim=80, n_layers=2)
    model = make(cfg)
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf")
    info = inspect_gguf(p)
    types = {t["name"]: t["type"] for t in info["tensors"]}
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == "Q8_0"  # K = dim = 256
    assert info["metadata"]["tritlm.fallback_f16"] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    back, _ = import_gguf(p)
    assert back.cfg == cfg
    src, got = layers(model), layers(back)
    for n in block_linears(cfg):
        np.testing.assert_array_equal(got[n][1], src[n][1], err_msg=n)
        np.testing.assert_allclose(got[n][2], src[n][2], rtol=2e-3, err_msg=n)


def test_i2s_refuses_mixed_models(tmp_path):
    with pytest.raises(FormatError, match=r"I2_S .*layers\.0\.self_attn\.q_proj is int8"):
        export_gguf(make(mixed_cfg()), None, tmp_path / "m.gguf", qtype="I2_S")
    per_row = mixed_cfg({"*": {"weight": "ternary", "scale": "channel"}}, sub_norm=True)
    with pytest.raises(FormatError, match="ternary-ch"):
        export_gguf(make(per_row), None, tmp_path / "m.gguf", qtype="I2_S")
    assert not (tmp_path / "m.gguf").exists()


def test_foreign_per_block_scales_load_that_layer_as_fp(tmp_path, caplog):
    """A Q8_0 tensor quantised by ggml from floats (its own d per 32 weights) is not an int8 layer of
    ours: that layer alone loads as full precision, exactly; the others keep their kinds."""
    model = make(mixed_cfg(SPEC))
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf")
    f = read_gguf(p)
    target = "blk.1.attn_v.weight"
    w = np.random.default_rng(0).standard_normal((128, 256)).astype(np.float32) * 0.02  # [out, in] of v_proj
    q8 = np.asarray(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))
    tensors = []
    for t in f.tensors:
        raw = f.tensor_bytes(t).tobytes()
        if t.name == target:
            raw = q8.tobytes()
        tensors.append((t.name, t.shape, t.ttype, raw))
    bad = tmp_path / "foreign.gguf"
    write_gguf(bad, {k: v for k, v in f.kv.items() if k != "general.alignment"}, tensors, kv_types=f.kv_types)
    with caplog.at_level("WARNING"):
        back, _ = import_gguf(bad)
    assert "layers.1.self_attn.v_proj" in caplog.text
    assert back.cfg.quant_for("layers.1.self_attn.v_proj").weight == "fp"
    assert back.cfg.quant_for("layers.0.self_attn.v_proj").weight == "int8"
    deq = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(back.get_submodule("layers.1.self_attn.v_proj").weight.detach().numpy(), deq)


def test_hf_refuses_mixed_models(tmp_path):
    from tritlm.formats.hf import export_hf

    with pytest.raises(FormatError, match=r"^hf: layers\.0\.self_attn\.q_proj is int8; transformers' BitNet "
                                          r"checkpoints hold ternary layers only - export GGUF instead$"):
        export_hf(make(mixed_cfg(SPEC)), ByteTokenizer(), tmp_path / "hf")
    cases = (({"layers.1.mlp.down_proj": "fp"}, "layers.1.mlp.down_proj is fp"),
             ({"*.o_proj": {"weight": "ternary", "scale": "channel"}}, "layers.0.self_attn.o_proj is ternary-ch"),
             ({"layers.1.*": {"weight": "int4", "group_size": 32}}, "layers.1.self_attn.q_proj is int4-g32"))
    for spec, first in cases:
        with pytest.raises(FormatError, match=first):
            export_hf(make(mixed_cfg(spec, sub_norm=True, tie_embeddings=True)), None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # all ternary per tensor (the uniform model written as overrides) still exports
    export_hf(make(mixed_cfg({"layers.*": "ternary"})), ByteTokenizer(), tmp_path / "ok")


# ---- llama.cpp --------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "sub_norm"), [(SPEC, False), (MIXED, True)], ids=["llama-spec", "bitnet-every-kind"])
def test_llama_cpp_agrees_on_mixed_model(tmp_path, spec, sub_norm):
    """llama.cpp runs a mixed file (TQ2_0 + Q8_0 + Q4_0 + F16 tensors) as our forward does."""
    pytest.importorskip("llama_cpp")
    t0 = time.perf_counter()
    cfg = mixed_cfg(spec, sub_norm=sub_norm, tie_embeddings=sub_norm)
    model = make(cfg, peaked=True)
    p = export_gguf(model, ByteTokenizer(), tmp_path / "m.gguf", fp_type="F16")
    types = {t.type_name for t in read_gguf(p).tensors}
    assert {"TQ2_0", "Q8_0", "Q4_0", "F16"} <= types
    ids = torch.randint(0, 256, (250,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = open_llama(p, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    back, _ = import_gguf(p)  # our forward over exactly the file's weights (scales rounded to fp16)
    results = {}
    for label, ref in (("source model", model), ("file weights", back)):
        ours = logits(ref, torch.tensor([ids])).numpy()
        agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        rel = float(np.abs(theirs - ours).max() / np.abs(ours).max())
        results[label] = (agree, rel)
    msg = "; ".join(f"vs {k}: top-1 {a:.2%} over {len(ids)} positions, max rel logit error {r:.2e}"
                    for k, (a, r) in results.items())
    print(f"llama.cpp mixed model, arch {read_gguf(p).kv['general.architecture']}, types {sorted(types)}: {msg} "
          f"({time.perf_counter() - t0:.1f} s)")
    assert all(a >= 0.99 for a, _ in results.values()), msg
