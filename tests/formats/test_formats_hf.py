"""Hugging Face transformers interop: what we write loads in transformers with the same logits, and
what transformers writes (Llama, BitNet) loads here with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' BitNet quantiser refuses to load without it

from fuzzing import SETTINGS, try_load  # noqa: E402  (tests/formats helper)

from tritlm.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer  # noqa: E402
from tritlm.errors import FormatError  # noqa: E402
from tritlm.formats.common import block_linears, quantised_linear, rel_error  # noqa: E402
from tritlm.formats.hf import export_hf, import_hf, pack_hf, to_hf_tokenizer, unpack_hf  # noqa: E402
from tritlm.model.config import ModelConfig  # noqa: E402
from tritlm.model.transformer import Transformer  # noqa: E402
from tritlm.quant.config import BINARY, FP, TERNARY  # noqa: E402


@pytest.fixture(autouse=True)
def _no_compile():
    # transformers wraps its BitLinear helpers in torch.compile; eager mode gives the same numbers
    # and saves a minute of inductor compilation per test on a 2-core machine.
    import torch._dynamo
    import transformers

    transformers.logging.set_verbosity_error()
    with torch._dynamo.config.patch(disable=True):
        yield


def bitnet_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                mlp="relu2", sub_norm=True, tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-5, quant=TERNARY)
    base.update(kw)
    return ModelConfig(**base)


def make(cfg: ModelConfig, seed: int = 1) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    hm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return hm(ids).logits[0], hm


def ours(model, ids):
    with torch.no_grad():
        return model(ids)[0][0]


def assert_quantised_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Logits of two int8-activation implementations agree to float32 rounding except where a 1-ulp
    difference moves an activation across a rounding boundary (one int8 step); such a flip perturbs
    a few positions by ~0.5% of the logit range in these random models, so most positions must
    match to < 1e-5 and nearly all to < 1e-3, with the same top-1."""
    per_pos = torch.tensor([rel_error(a[i], b[i]) for i in range(a.shape[0])])
    assert float(per_pos.median()) < 1e-5, per_pos
    assert float((per_pos < 1e-3).float().mean()) >= 0.9, per_pos
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.95


def test_pack_layout_matches_transformers():
    from transformers.integrations.bitnet import pack_weights

    q = torch.randint(-1, 2, (12, 5), dtype=torch.int8)
    ref = pack_weights(q.clone().to(torch.int32))
    assert torch.equal(pack_hf(q), ref)
    assert torch.equal(unpack_hf(pack_hf(q)), q)


@pytest.mark.parametrize("linear_class", ["autobitlinear", "bitlinear"])
def test_export_bitnet_loads_in_transformers(tmp_path, linear_class):
    model = make(bitnet_cfg())
    export_hf(model, ByteTokenizer(), tmp_path / "m", linear_class=linear_class)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["model_type"] == "bitnet" and conf["quantization_config"]["linear_class"] == linear_class
    ids = torch.randint(0, 257, (1, 40), generator=torch.Generator().manual_seed(0))
    a, hm = hf_logits(tmp_path / "m", ids)
    assert type(hm).__name__ == "BitNetForCausalLM"
    b = ours(model, ids)
    assert_quantised_close(a, b)
    # The weights transformers holds are exactly ours (the format is lossless).
    for name in block_linears(model.cfg)[:7]:
        q, s = quantised_linear(model, name)
        lin = hm.model.get_submodule(name)
        if linear_class == "autobitlinear":
            assert torch.equal(lin.weight.to(torch.int8), q)
            assert float(lin.weight_scale) == pytest.approx(s, rel=1e-7)
        else:
            assert float(lin.weight_scale) == pytest.approx(1 / s, rel=1e-7)


def test_export_bitnet_logits_seed_without_flip(tmp_path):
    """The headline number: with no rounding flip the whole logit tensor agrees to ~1e-7."""
    model = make(bitnet_cfg(), seed=3)
    export_hf(model, ByteTokenizer(), tmp_path / "m")
    ids = torch.randint(0, 257, (1, 48), generator=torch.Generator().manual_seed(3))
    a, _ = hf_logits(tmp_path / "m", ids)
    assert rel_error(a, ours(model, ids)) < 1e-3


def test_export_llama_with_bitnet_quant_and_fp(tmp_path):
    # no SubLN -> LlamaForCausalLM + bitnet quantization_config; odd ffn (out % 4 != 0) stays unpacked
    model = make(bitnet_cfg(sub_norm=False, mlp="swiglu", ffn_dim=90, tie_embeddings=False))
    export_hf(model, ByteTokenizer(), tmp_path / "q")
    ids = torch.randint(0, 257, (1, 32), generator=torch.Generator().manual_seed(1))
    a, hm = hf_logits(tmp_path / "q", ids)
    assert type(hm).__name__ == "LlamaForCausalLM"
    assert_quantised_close(a, ours(model, ids))
    fp = make(bitnet_cfg(sub_norm=False, mlp="swiglu", quant=FP))
    export_hf(fp, ByteTokenizer(), tmp_path / "f")
    a, _ = hf_logits(tmp_path / "f", ids)
    assert rel_error(a, ours(fp, ids)) < 1e-3


def test_round_trip_tritlm_hf_tritlm(tmp_path):
    for cfg in (bitnet_cfg(), bitnet_cfg(quant=BINARY), bitnet_cfg(quant=FP, sub_norm=False)):
        model = make(cfg)
        export_hf(model, ByteTokenizer(), tmp_path / "m")
        back, tok = import_hf(tmp_path / "m")
        assert back.cfg == cfg
        assert tok.fingerprint() == ByteTokenizer().fingerprint()
        ids = torch.randint(0, 257, (1, 32), generator=torch.Generator().manual_seed(2))
        if cfg.quantised:
            for name in block_linears(cfg):
                (q1, s1), (q2, s2) = quantised_linear(model, name), quantised_linear(back, name)
                assert torch.equal(q1, q2) and s2 == pytest.approx(s1, rel=1e-6)
        assert_quantised_close(ours(back, ids), ours(model, ids))


def test_import_llama_from_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     rms_norm_eps=1e-6, tie_word_embeddings=False)
    hm = LlamaForCausalLM(hc).eval()
    hm.save_pretrained(tmp_path / "llama")
    model, tok = import_hf(tmp_path / "llama")
    assert tok is None and not model.cfg.quantised and model.cfg.mlp == "swiglu"
    ids = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = hm(ids).logits[0]
    assert rel_error(ours(model, ids), a) < 1e-3


def test_import_bitnet_online_latent_weights(tmp_path):
    """An 'online' BitNet checkpoint (latent float weights quantised on the fly) from transformers."""
    from transformers import BitNetConfig, BitNetForCausalLM

    torch.manual_seed(0)
    hc = BitNetConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    BitNetForCausalLM(hc).save_pretrained(tmp_path / "b")
    conf = json.loads((tmp_path / "b" / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                   "quantization_mode": "online", "modules_to_not_convert": ["lm_head"]}
    (tmp_path / "b" / "config.json").write_text(json.dumps(conf))
    model, _ = import_hf(tmp_path / "b")
    assert model.cfg.quantised and model.cfg.sub_norm
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    a, _ = hf_logits(tmp_path / "b", ids)
    assert_quantised_close(ours(model, ids), a)


def test_tokenizer_conversion_is_exact():
    text = "Hello, world!\n  héllo \u2603 x"
    bt = ByteTokenizer()
    hb = to_hf_tokenizer(bt)
    assert hb.encode(text).ids == bt.encode(text)
    assert hb.decode(bt.encode(text)) == text
    ct = CharTokenizer.from_text(text)
    hc = to_hf_tokenizer(ct)
    assert hc.encode(text).ids == ct.encode(text)
    assert hc.decode(ct.encode(text)) == text
    bpe = HFTokenizer.train_bpe("the cat sat on the mat " * 50, 300)
    assert to_hf_tokenizer(bpe) is bpe.tok


def test_exported_tokenizer_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    ct = CharTokenizer.from_text("abc def\n")
    export_hf(make(bitnet_cfg(vocab_size=ct.vocab_size)), ct, tmp_path / "m")
    at = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert at("cab fed", add_special_tokens=False)["input_ids"] == ct.encode("cab fed")


def test_unsupported_options_are_refused(tmp_path):
    with pytest.raises(FormatError, match="QK-norm"):
        export_hf(make(bitnet_cfg(qk_norm=True)), None, tmp_path / "x")
    with pytest.raises(FormatError, match="residual_scale"):
        export_hf(make(bitnet_cfg(residual_scale=0.5)), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_import_refuses_bad_folders(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(FormatError, match="gpt2"):
        import_hf(tmp_path)
    model = make(bitnet_cfg())
    export_hf(model, None, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(FormatError, match="safetensors"):
        import_hf(tmp_path / "m")


def test_fuzz_loader(tmp_path):
    """Mutated real checkpoints (safetensors header/data, config.json): a model or a FormatError."""
    import shutil

    from hypothesis import given
    from hypothesis import strategies as st

    src = tmp_path / "src"
    export_hf(make(bitnet_cfg(n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)), None, src)
    st_bytes = (src / "model.safetensors").read_bytes()
    conf_bytes = (src / "config.json").read_bytes()
    head = 8 + int.from_bytes(st_bytes[:8], "little")
    tried = {"n": 0, "loaded": 0, "errors": 0}
    target = tmp_path / "t"
    shutil.copytree(src, target)
    which = st.sampled_from(["st", "st", "config"])
    pos = st.one_of(st.integers(0, head - 1), st.integers(0, len(st_bytes) - 1))

    @SETTINGS
    @given(which, st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=3), st.integers(0, 40))
    def run(kind, muts, cut):
        b = bytearray(st_bytes if kind == "st" else conf_bytes)
        for p_, v in muts:
            b[p_ % len(b)] = v
        if cut < 5:
            b = b[: len(b) * cut // 5]
        (target / "model.safetensors").write_bytes(bytes(b) if kind == "st" else st_bytes)
        (target / "config.json").write_bytes(bytes(b) if kind == "config" else conf_bytes)
        try_load(lambda: import_hf(target, load_tokenizer_too=False), tried)

    run()
    assert tried["n"] >= 300
    print(f"hf fuzz: {tried}")
