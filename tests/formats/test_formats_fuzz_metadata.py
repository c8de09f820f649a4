"""Metadata fuzzing of every loader: the declared model (config.json of checkpoints, packed and
transformers folders, GGUF metadata keys and tritlm.config, the .1bit JSON header) mutated in
sizes, counts, types and nesting, and the model files replaced by non-regular files. Every outcome
is a model or a one-line FormatError: no other exception, no hang, no model built beyond the size
of the file (fuzzing.guard_builds). The counts go to docs/hardening.md."""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
from pathlib import Path

import pytest
import torch
from fuzzing import (  # tests/formats helper
    SETTINGS,
    dumps,
    fuzz_single_file,
    guard_builds,
    mutate_json,
    scalars,
    try_load,
    values,
)
from hypothesis import given
from hypothesis import strategies as st

from tritlm.data.tokenizer import CharTokenizer
from tritlm.errors import FormatError
from tritlm.formats import checkpoint as ck
from tritlm.formats.native import load_native
from tritlm.formats.onebit import ENTRY, HEADER, export_onebit, load_onebit, read_onebit
from tritlm.formats.packed import from_transformer, inspect_packed, load_packed, save_packed
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.quant.config import TERNARY

# small: a load takes milliseconds (GGUF stores its rows as F16, which does not matter here)
TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n")
CFG = dict(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16,
           quant=TERNARY)
COUNTS: dict[str, dict] = {}


@pytest.fixture(autouse=True)
def no_oversized_build(monkeypatch):
    guard_builds(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for name, t in COUNTS.items():
        print(f"metadata fuzz {name}: {t}")


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CFG)).eval()


def fuzz(name: str, write, load, non_regular_files=(), check=None) -> dict:
    """300 drawn inputs: ``write(data)`` writes one from hypothesis ``data``, ``load()`` reads it,
    ``check(loaded)`` may look further; then the ``non_regular_files`` (see :func:`non_regular`)."""
    tried = {"n": 0, "loaded": 0, "errors": 0}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    @SETTINGS
    @given(st.data())
    def run(data):
        write(data)
        before = tried["loaded"]
        try_load(load, tried)
        if check is not None:
            check(tried["loaded"] > before)

    run()
    for f in non_regular_files:
        non_regular(name, f, load, tried)
    assert tried["n"] >= 300
    # the process's high-water mark: no input made it allocate (and touch) more than this
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) // 1024
    assert grew < 512, f"peak memory grew by {grew} MiB"
    COUNTS[name] = {**tried, "peak_rss_growth_mib": grew}
    return tried


def fuzz_json_files(name: str, files: list[Path], load, non_regular_files=(), check=None) -> dict:
    """Mutations of one (drawn) of the JSON documents ``files``, each loaded with ``load``."""
    originals = {p: p.read_bytes() for p in files}

    def write(data):
        for p, b in originals.items():  # undo the previous input's mutation
            p.write_bytes(b)
        p = data.draw(st.sampled_from(files))
        p.write_text(dumps(mutate_json(data, json.loads(originals[p]))))

    try:
        return fuzz(name, write, load, non_regular_files, check)
    finally:
        for p, b in originals.items():
            p.write_bytes(b)


def non_regular(name: str, target: Path, load, tried: dict) -> None:
    """``target`` replaced by a folder, a FIFO, a dangling link, a link to itself and /dev/null."""
    keep = target.with_name(target.name + ".keep")
    loaded = tried["loaded"]
    os.replace(target, keep)
    try:
        for make in (lambda p: p.mkdir(), lambda p: os.mkfifo(p), lambda p: p.symlink_to(p.with_name("nowhere")),
                     lambda p: p.symlink_to(p), lambda p: p.symlink_to("/dev/null")):
            make(target)
            try:
                try_load(load, tried)
            finally:
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    finally:
        os.replace(keep, target)
    assert tried["loaded"] == loaded, name  # nothing loads without its model file


def test_checkpoint_metadata(tmp_path):
    path = ck.save_checkpoint(tmp_path / "run", 1, model(), None, {"x": 1},
                              {"model": ModelConfig(**CFG).to_dict(), "tokenizer": "byte"}, TOK)
    files = [path / "config.json", path / "state.json", path.parent / "latest.json",
             path / "tokenizer" / "tokenizer_config.json"]
    fuzz_json_files("checkpoint", files, lambda: load_native(tmp_path / "run"),
                    [path / f for f in ("model.safetensors", "config.json", "state.json")])


def test_packed_metadata(tmp_path):
    out = save_packed(from_transformer(model(), TOK), tmp_path / "p")

    def inspect(_loaded: bool) -> None:  # tritlm inspect reads the same config.json
        try:
            inspect_packed(out)
        except FormatError as e:
            assert "\n" not in str(e)

    fuzz_json_files("packed", [out / "config.json"], lambda: load_packed(out),
                    [out / "model.safetensors", out / "config.json"], inspect)


def test_hf_metadata(tmp_path):
    pytest.importorskip("transformers")
    from tritlm.formats.hf import export_hf, import_hf

    out = export_hf(model(), TOK, tmp_path / "h")
    fuzz_json_files("hf", [out / "config.json"], lambda: import_hf(out),
                    [out / "model.safetensors", out / "config.json"])


def _rewrite_onebit(src: bytes, meta: str, dst: Path) -> None:
    """``src`` with its JSON header replaced by ``meta``; table and data moved to fit."""
    magic, ver, flags, n, jlen, toff, doff = HEADER.unpack_from(src, 0)
    raw = meta.encode("utf-8")
    ntoff = -(-(HEADER.size + len(raw)) // 8) * 8
    ndoff = -(-(ntoff + n * ENTRY.size) // 64) * 64
    table = bytearray()
    for i in range(n):
        e = list(ENTRY.unpack_from(src, toff + i * ENTRY.size))
        e[7] += ndoff - doff  # absolute offsets move with the data
        table += ENTRY.pack(*e)
    out = HEADER.pack(magic, ver, flags, n, len(raw), ntoff, ndoff) + raw
    out += b"\0" * (ntoff - len(out)) + table
    dst.write_bytes(out + b"\0" * (ndoff - len(out)) + src[doff:])


def test_onebit_metadata(tmp_path):
    src = export_onebit(model(), TOK, tmp_path / "s.1bit")
    data = src.read_bytes()
    meta, _, _ = read_onebit(src)
    target = tmp_path / "f.1bit"
    fuzz(".1bit", lambda d: _rewrite_onebit(data, dumps(mutate_json(d, meta)), target),
         lambda: load_onebit(target), [target])


def test_gguf_metadata(tmp_path):
    pytest.importorskip("gguf")
    from tritlm.formats.gguf import export_gguf, import_gguf
    from tritlm.formats.gguf_io import read_gguf, write_gguf
    from tritlm.formats.gguf_tools import validate_gguf

    src = export_gguf(model(), TOK, tmp_path / "s.gguf")
    f = read_gguf(src)
    kv = {k: v for k, v in f.kv.items() if k != "general.alignment"}
    tensors = [(t.name, t.shape, t.ttype, f.tensor_bytes(t).tobytes()) for t in f.tensors]
    keys = sorted(k for k in kv if k.startswith(f"{kv['general.architecture']}.")) + [
        "tritlm.config", "tritlm.tokenizer.kind", "general.architecture", "tokenizer.ggml.tokens", "general.file_type"]
    target = tmp_path / "f.gguf"
    gguf_value = st.one_of(scalars(gguf=True), st.lists(st.text(max_size=4), max_size=3),
                           st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=3))

    def write(d):
        new = dict(kv)
        for _ in range(d.draw(st.integers(1, 3))):
            key, op = d.draw(st.sampled_from(keys)), d.draw(st.sampled_from(["value", "value", "json", "drop"]))
            if op == "drop":
                new.pop(key, None)
            elif op == "json":
                new[key] = dumps(mutate_json(d, json.loads(kv[key])) if key == "tritlm.config" else d.draw(values()))
            else:
                new[key] = d.draw(gguf_value)
        write_gguf(target, new, tensors)  # value types inferred from the drawn values

    def check(loaded: bool) -> None:
        rep = validate_gguf(target, forward=False)  # never raises, and never passes a file that does not load
        assert not rep["ok"] or loaded, rep

    fuzz("gguf", write, lambda: import_gguf(target), [target], check)


def test_gguf_nesting_and_counts(tmp_path):
    """Nested arrays and element / tensor / key counts from 0 to 2**64 - 1, in a raw file."""
    pytest.importorskip("gguf")
    from tritlm.formats.gguf import import_gguf

    target = tmp_path / "n.gguf"
    counts = st.sampled_from([0, 1, 2, 255, 1 << 20, 1 << 32, (1 << 63) - 1, (1 << 64) - 1])

    def write(d):
        depth, etype, n_elem = d.draw(st.integers(0, 20_000)), d.draw(st.integers(0, 12)), d.draw(counts)
        body = struct.pack("<Q", 1) + b"x" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth
        body += struct.pack("<IQ", etype, n_elem) + d.draw(st.binary(max_size=64))
        target.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, d.draw(counts), d.draw(counts)) + body)

    fuzz("gguf raw nesting / counts", write, lambda: import_gguf(target))


@pytest.mark.parametrize("kind", ["checkpoint", "packed"])
def test_safetensors_header_bytes(tmp_path, kind):
    """Byte mutations of model.safetensors (mostly in its JSON header: names, dtypes, shapes,
    offsets) of a checkpoint and a packed folder."""
    if kind == "checkpoint":
        folder = ck.save_checkpoint(tmp_path / "run", 1, model(), None, {}, {"model": ModelConfig(**CFG).to_dict()},
                                    TOK)
        load = load_native
    else:
        folder, load = save_packed(from_transformer(model(), TOK), tmp_path / "p"), load_packed
    data = (folder / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    tried = fuzz_single_file(data, header, folder / "model.safetensors", lambda _: load(folder), truncate_below=header)
    COUNTS[f"{kind} safetensors bytes"] = tried
