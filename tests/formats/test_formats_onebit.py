"""The .1bit format: round trip, the generated C header compiles and reads our files, bad input."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest
import torch
from fuzzing import fuzz_single_file  # tests/formats helper

from tritlm.data.tokenizer import ByteTokenizer, CharTokenizer
from tritlm.errors import FormatError
from tritlm.formats.common import block_linears, quantised_linear, rel_error
from tritlm.formats.onebit import c_header, export_onebit, load_onebit, read_onebit
from tritlm.model.config import ModelConfig
from tritlm.model.transformer import Transformer
from tritlm.quant.config import BINARY, FP, TERNARY


def make(quant=TERNARY, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=90, max_seq_len=32,
                quant=quant)
    base.update(kw)
    return Transformer(ModelConfig(**base)).eval()


@pytest.mark.parametrize("quant", [TERNARY, BINARY])
def test_round_trip(tmp_path, quant):
    m = make(quant, sub_norm=True, mlp="relu2", tie_embeddings=quant is BINARY)
    p = export_onebit(m, ByteTokenizer(), tmp_path / "m.1bit", fp_dtype="fp32")
    back, tok = load_onebit(p)
    assert back.cfg == m.cfg and tok.fingerprint() == ByteTokenizer().fingerprint()
    for n in block_linears(m.cfg):
        (q1, s1), (q2, s2) = quantised_linear(m, n), quantised_linear(back, n)
        assert torch.equal(q1, q2) and s2 == pytest.approx(s1, rel=1e-6)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert rel_error(back(ids)[0], m(ids)[0]) < 2e-2  # only activation-rounding flips can differ
    _, table, _ = read_onebit(p)
    kinds = {t["dtype"] for t in table}
    assert ("BINARY1" if quant is BINARY else "TERNARY2") in kinds


def test_fp16_size_and_char_tokenizer(tmp_path):
    m = make()
    ct = CharTokenizer.from_text("hello world")
    p = export_onebit(m, ct, tmp_path / "m.1bit")
    back, tok = load_onebit(p)
    assert tok.chars == ct.chars
    n_lin = sum(m.get_submodule(n).weight.numel() for n in block_linears(m.cfg))
    n_fp = m.num_params() - n_lin
    assert p.stat().st_size < n_lin / 4 + 2 * n_fp + 64 * 40 + 4096


def test_refuses_fp_model(tmp_path):
    with pytest.raises(FormatError, match="quantise"):
        export_onebit(make(FP), None, tmp_path / "x.1bit")
    assert not (tmp_path / "x.1bit").exists()


C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "onebit.h"
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 10;
    fseek(f, 0, SEEK_END); long len = ftell(f); fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(len);
    if (fread(buf, 1, len, f) != (size_t)len) return 11;
    onebit_header_t h;
    int rc = onebit_check_header(buf, (uint64_t)len, &h);
    if (rc) { printf("error %d\n", rc); return 1; }
    printf("version %u tensors %u json %u\n", h.version, h.n_tensors, h.json_len);
    for (uint32_t i = 0; i < h.n_tensors; i++) {
        onebit_tensor_t t;
        memcpy(&t, buf + h.table_offset + i * sizeof(t), sizeof(t));
        if (t.dtype == ONEBIT_TERNARY2) {
            const uint8_t *row = buf + t.offset;
            printf("%s %u %u %.6g %d %d %d\n", t.name, t.rows, t.cols, t.scale,
                   onebit_ternary_at(row, 0), onebit_ternary_at(row, 1), onebit_ternary_at(row, 5));
            break;
        }
    }
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_c_header_compiles_and_reads_file(tmp_path):
    (tmp_path / "onebit.h").write_text(c_header())
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Werror", "-fsyntax-only", "-x", "c", str(tmp_path / "onebit.h")],
                   check=True)
    (tmp_path / "r.c").write_text(C_PROGRAM)
    subprocess.run(["gcc", "-std=c99", "-Wall", "-O1", "-I", str(tmp_path), str(tmp_path / "r.c"), "-o",
                    str(tmp_path / "r")], check=True)
    m = make()
    p = export_onebit(m, None, tmp_path / "m.1bit", c_header_path=tmp_path / "gen.h")
    assert (tmp_path / "gen.h").read_text() == c_header()
    out = subprocess.run([str(tmp_path / "r"), str(p)], check=True, capture_output=True, text=True).stdout.split("\n")
    _, table, _ = read_onebit(p)
    assert out[0] == f"version 1 tensors {len(table)} json {struct.unpack_from('<I', p.read_bytes(), 12)[0]}"
    first = next(t for t in table if t["dtype"] == "TERNARY2")
    name, rows, cols, scale, *lv = out[1].split()
    q, s = quantised_linear(m, first["name"].rsplit(".", 1)[0])
    assert name == first["name"] and (int(rows), int(cols)) == tuple(q.shape)
    assert float(scale) == pytest.approx(s, rel=1e-5)
    assert [int(x) for x in lv] == [int(q[0, 0]), int(q[0, 1]), int(q[0, 5])]


def test_bad_files(tmp_path):
    p = export_onebit(make(), ByteTokenizer(), tmp_path / "m.1bit")
    data = p.read_bytes()
    cases = {"trunc": data[:-100], "short": data[:20], "magic": b"2BIT" + data[4:],
             "version": data[:4] + struct.pack("<H", 7) + data[6:], "flip": data[:-200] + bytes([data[-200] ^ 1]) +
             data[-199:]}
    for name, blob in cases.items():
        f = tmp_path / f"{name}.1bit"
        f.write_bytes(blob)
        with pytest.raises(FormatError) as e:
            load_onebit(f)
        assert "\n" not in str(e.value), name


def test_fuzz_loader(tmp_path):
    src = export_onebit(make(n_layers=1, dim=32, n_heads=2, ffn_dim=64), ByteTokenizer(), tmp_path / "s.1bit")
    data = src.read_bytes()
    _, table, _ = read_onebit(src)
    head = table[0]["offset"]
    tried = fuzz_single_file(data, head, tmp_path / "f.1bit", load_onebit, truncate_below=100)
    print(f".1bit fuzz: {tried}")
