"""Metadata is checked before it is trusted: a config that declares a bigger (or different) model
than the file's tensors, absurd counts, deep nesting, overflowing shapes, wrong types, unknown
tokenizers and non-finite weights are one-line FormatErrors, and no loader builds layers from
unchecked sizes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from fuzzing import guard_builds  # tests/formats helper

pytest.importorskip("gguf")

from tritlm.data.tokenizer import ByteTokenizer  # noqa: E402
from tritlm.errors import FormatError, TritlmError  # noqa: E402
from tritlm.formats import checkpoint as ck  # noqa: E402
from tritlm.formats.gguf import export_gguf, import_gguf  # noqa: E402
from tritlm.formats.gguf_io import read_gguf, write_gguf  # noqa: E402
from tritlm.formats.gguf_tools import validate_gguf  # noqa: E402
from tritlm.formats.native import load_native  # noqa: E402
from tritlm.formats.onebit import export_onebit, load_onebit  # noqa: E402
from tritlm.formats.packed import from_transformer, load_packed, save_packed  # noqa: E402
from tritlm.model.config import ModelConfig  # noqa: E402
from tritlm.model.transformer import Transformer  # noqa: E402
from tritlm.quant.config import TERNARY  # noqa: E402

SMALL = dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16, quant=TERNARY)
# (model config changes) a file of the SMALL model must not be loaded as; each passes ModelConfig's
# own bounds, so only a comparison with the tensors can refuse it
HUGE = [{"dim": 1 << 16, "n_heads": 512, "vocab_size": 1 << 20}, {"n_layers": 4000},
        {"ffn_dim": 1 << 19}, {"vocab_size": 1 << 24}, {"max_seq_len": 1 << 22, "dim": 1 << 12, "n_heads": 2},
        {"max_seq_len": 1 << 22}]


@pytest.fixture(autouse=True)
def no_oversized_build(monkeypatch):
    """Fail any Transformer build far larger than the test files (instead of allocating gigabytes)."""
    guard_builds(monkeypatch)


def small(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SMALL, **kw})).eval()


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def _checkpoint(tmp_path, model=None, edit=None):
    """A saved checkpoint of ``model``; ``edit`` changes its config.json's model config afterwards."""
    model = model or small()
    path = ck.save_checkpoint(tmp_path / "run", 1, model, None, {}, {"model": model.cfg.to_dict()}, ByteTokenizer())
    if edit:
        conf = json.loads((path / "config.json").read_text())
        conf["model"].update(edit)
        (path / "config.json").write_text(json.dumps(conf))
    return path


# ---- 1. sizes: compared with the tensor index before anything of that size is built ----------------
@pytest.mark.parametrize("edit", HUGE)
def test_checkpoint_config_bigger_than_its_tensors(tmp_path, edit):
    path = _checkpoint(tmp_path, edit=edit)
    with pytest.raises(FormatError) as e:
        load_native(path)
    one_line(e)


@pytest.mark.parametrize("edit", HUGE)
def test_packed_config_bigger_than_its_tensors(tmp_path, edit):
    out = save_packed(from_transformer(small(), ByteTokenizer()), tmp_path / "p")
    conf = json.loads((out / "config.json").read_text())
    conf["model"].update(edit)
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(FormatError) as e:
        load_packed(out)
    one_line(e)


def _rewrite_gguf(src, dst, kv_edit=None, drop=()):
    f = read_gguf(src)
    kv = {k: v for k, v in f.kv.items() if k != "general.alignment" and k not in drop}
    kv.update(kv_edit or {})
    types = {k: t for k, t in f.kv_types.items() if k in kv and k not in (kv_edit or {})}
    write_gguf(dst, kv, [(t.name, t.shape, t.ttype, f.tensor_bytes(t).tobytes()) for t in f.tensors], kv_types=types)
    return dst


@pytest.mark.parametrize("edit", HUGE)
def test_gguf_tritlm_config_bigger_than_its_tensors(tmp_path, edit):
    src = export_gguf(small(dim=256, ffn_dim=256), None, tmp_path / "s.gguf")
    cfg = json.loads(read_gguf(src).kv["tritlm.config"])
    cfg.update(edit)
    p = _rewrite_gguf(src, tmp_path / "b.gguf", {"tritlm.config": json.dumps(cfg)})
    with pytest.raises(FormatError) as e:
        import_gguf(p)
    one_line(e)
    rep = validate_gguf(p)
    assert not rep["ok"]


@pytest.mark.parametrize(("key", "value"), [("embedding_length", 1 << 30), ("embedding_length", 1 << 14),
                                            ("block_count", 4000), ("feed_forward_length", 1 << 19),
                                            ("context_length", 1 << 40), ("attention.head_count", 0)])
def test_gguf_llama_keys_bigger_than_its_tensors(tmp_path, key, value):
    src = export_gguf(small(dim=256, ffn_dim=256), None, tmp_path / "s.gguf")
    arch = read_gguf(src).kv["general.architecture"]
    p = _rewrite_gguf(src, tmp_path / "b.gguf", {f"{arch}.{key}": value}, drop=("tritlm.config",))
    if key == "context_length":  # clamped, not trusted: loads
        assert import_gguf(p)[0].cfg.max_seq_len <= 8192
        return
    with pytest.raises(FormatError) as e:
        import_gguf(p)
    one_line(e)
    assert not validate_gguf(p)["ok"]


@pytest.mark.parametrize("edit", HUGE + [{"num_key_value_heads": 3}])
def test_hf_config_bigger_than_its_tensors(tmp_path, edit):
    pytest.importorskip("transformers")
    from tritlm.formats.hf import export_hf, import_hf

    out = export_hf(small(sub_norm=True, mlp="relu2"), None, tmp_path / "h")
    conf = json.loads((out / "config.json").read_text())
    names = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "ffn_dim": "intermediate_size", "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings"}
    conf.pop("tritlm_config")
    conf.pop("head_dim")
    conf.update({names.get(k, k): v for k, v in edit.items()})
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(FormatError) as e:
        import_hf(out, load_tokenizer_too=False)
    one_line(e)


@pytest.mark.parametrize("edit", HUGE)
def test_onebit_config_bigger_than_its_tensors(tmp_path, edit):
    p = export_onebit(small(), ByteTokenizer(), tmp_path / "m.1bit")
    b = bytearray(p.read_bytes())
    jlen = struct.unpack_from("<I", b, 12)[0]
    meta = json.loads(bytes(b[32:32 + jlen]))
    meta["config"].update(edit)
    new = json.dumps(meta, separators=(",", ":")).encode()
    assert len(new) <= jlen  # the export's JSON has spaces to spare
    b[32:32 + jlen] = new + b" " * (jlen - len(new))
    p.write_bytes(bytes(b))
    with pytest.raises(FormatError) as e:
        load_onebit(p)
    one_line(e)


# ---- 2. nesting, overflow, types, tokenizers, non-finite weights ----------------------------------
def _gguf_bytes(kv_payload: bytes, n_kv: int, tensor_table: bytes = b"", n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv_payload + tensor_table


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_gguf_deeply_nested_arrays(tmp_path):
    depth = 100_000
    payload = _key("x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 0, 0)
    p = tmp_path / "n.gguf"
    p.write_bytes(_gguf_bytes(payload, 1) + b"\0" * 64)
    with pytest.raises(FormatError, match="nest") as e:
        read_gguf(p)
    one_line(e)
    assert not validate_gguf(p)["ok"]


@pytest.mark.parametrize("shape", [(1 << 32, 1 << 32, 1 << 32, 1), (1 << 40, 1 << 40), (1 << 32, 1 << 31)])
def test_gguf_shape_whose_byte_size_overflows(tmp_path, shape):
    dims = struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
    table = _key("t") + dims + struct.pack("<IQ", 0, 0)
    p = tmp_path / "o.gguf"
    p.write_bytes(_gguf_bytes(b"", 0, table, 1) + b"\0" * 256)
    with pytest.raises(FormatError) as e:
        read_gguf(p)
    one_line(e)


def test_gguf_unknown_tokenizer_kind(tmp_path):
    src = export_gguf(small(dim=256, ffn_dim=256, vocab_size=257), ByteTokenizer(), tmp_path / "s.gguf")
    p = _rewrite_gguf(src, tmp_path / "t.gguf", {"tritlm.tokenizer.kind": "wordpiece-9000"})
    with pytest.raises(FormatError, match="wordpiece-9000") as e:
        import_gguf(p)
    one_line(e)
    rep = validate_gguf(p)
    assert not rep["ok"] and any("tokenizer" in x for x in rep["problems"])


def test_gguf_v2_file_validates(tmp_path):
    src = export_gguf(small(dim=256, ffn_dim=256, vocab_size=257), ByteTokenizer(), tmp_path / "s.gguf")
    b = bytearray(src.read_bytes())
    b[4:8] = struct.pack("<I", 2)  # v2 and v3 share the layout (v1 had 32-bit counts)
    p = tmp_path / "v2.gguf"
    p.write_bytes(bytes(b))
    rep = validate_gguf(p)
    assert rep["ok"], rep["problems"]
    assert any("v2" in c for c in rep["checks"])


@pytest.mark.parametrize("edit", [{"n_kv_heads": -1}, {"norm_eps": "x"}, {"quant": {"act_bits": "8"}},
                                  {"dim": "32"}, {"n_layers": 1.5}, {"tie_embeddings": "yes"}, {"quant": 7}])
def test_checkpoint_config_values_of_the_wrong_type(tmp_path, edit):
    path = _checkpoint(tmp_path, edit=edit)
    with pytest.raises(TritlmError) as e:
        load_native(path)
    one_line(e)


@pytest.mark.parametrize("latest", ["[1]", '"step-000001"', '{"path": 5}', '{"path": null}', "7", '{"step": 1}'])
def test_latest_json_of_the_wrong_type(tmp_path, latest):
    path = _checkpoint(tmp_path)
    (path.parent / "latest.json").write_text(latest)
    assert ck.latest_checkpoint(path.parent) == path  # falls back to a folder scan
    model, _, _ = load_native(tmp_path / "run")
    assert model.cfg.dim == SMALL["dim"]


def _poisoned(value: float) -> Transformer:
    m = small()
    with torch.no_grad():
        m.embed_tokens.weight[3, 5] = value
    return m


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_everywhere(tmp_path, value):
    from tritlm.formats.detect import write_format

    m = _poisoned(value)
    # every exporter and the packer refuse them, naming the tensor
    for fmt, out in [("gguf-tq2_0", tmp_path / "m.gguf"), ("1bit", tmp_path / "m.1bit"), ("hf", tmp_path / "h")]:
        with pytest.raises(FormatError, match="embed_tokens") as e:
            write_format(m, ByteTokenizer(), fmt, out)
        one_line(e)
        assert not out.exists()
    with pytest.raises(FormatError, match="embed_tokens"):
        from_transformer(m, ByteTokenizer())
    # and every loader refuses a file that holds them
    path = _checkpoint(tmp_path, model=m)
    with pytest.raises(FormatError, match="embed_tokens") as e:
        load_native(path)
    one_line(e)


def test_non_finite_weights_in_an_hf_folder(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from tritlm.formats.hf import export_hf, import_hf

    out = export_hf(small(sub_norm=True, mlp="relu2"), None, tmp_path / "h")
    sd = load_file(str(out / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="model.norm.weight") as e:
        import_hf(out, load_tokenizer_too=False)
    one_line(e)


def test_non_finite_scale_in_a_gguf_is_refused(tmp_path):
    src = export_gguf(small(dim=256, ffn_dim=256), None, tmp_path / "s.gguf")
    f = read_gguf(src)
    t = f.by_name()["token_embd.weight"]
    b = bytearray(src.read_bytes())
    inf = (np.float16 if t.type_name == "F16" else np.float32)(np.inf).tobytes()
    b[f.data_offset + t.offset:f.data_offset + t.offset + len(inf)] = inf
    src.write_bytes(bytes(b))
    with pytest.raises(FormatError, match="token_embd") as e:
        import_gguf(src)
    one_line(e)
