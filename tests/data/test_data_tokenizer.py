"""Tokenizers: round trips on real text, GPT-2 / Mistral reference files, BPE training, save/load."""

import json
from pathlib import Path

import numpy as np
import pytest

from tritlm.data import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
    default_corpus_path,
    load_tokenizer,
    read_corpus,
    train_bpe,
)
from tritlm.data import tokenizer as tokmod
from tritlm.errors import ConfigError, FormatError, TritlmError

SHARED = (Path(__file__).resolve().parents[2] / "../shared/data").resolve()
GPT2_JSON = SHARED / "tokenizers/gpt2/tokenizer.json"
MISTRAL = SHARED / "tokenizers/mistral-7b-v0.1/tokenizer.model"
FOX = "Hello world! The quick brown fox jumps over the lazy dog."
FOX_IDS = [15496, 995, 0, 383, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
UNICODE = "naïve café — 漢字かな 🙂🚀\n\tÆØÅ \u200b end"


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is not available (shared data folder absent)")
    return path


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return read_corpus(default_corpus_path())


@pytest.fixture(scope="module")
def gpt2() -> HFTokenizer:
    return load_tokenizer(need(GPT2_JSON))


@pytest.fixture(scope="module")
def small_bpe(shakespeare) -> HFTokenizer:
    return train_bpe(shakespeare[:100_000], 400)


# ---- char ---------------------------------------------------------------------------------------
def test_char_round_trip_on_tiny_shakespeare(shakespeare):
    tok = CharTokenizer.from_text(shakespeare)
    assert tok.vocab_size == 65 and tok.chars == sorted(set(shakespeare))
    ids = tok.encode(shakespeare)
    assert len(ids) == len(shakespeare) and ids[:5] == [tok.chars.index(c) for c in shakespeare[:5]]
    assert tok.decode(ids) == shakespeare
    assert tok.encode_array(shakespeare).dtype == np.int64
    assert tok.bos_id is None and tok.eos_id is None and tok.kind == "char"


def test_char_unknown_character_is_a_clear_error():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TritlmError, match=r"'é'.*U\+00E9.*position 1"):
        tok.encode("aéb")
    # Ids past the vocabulary (a padded model head) decode to U+FFFD instead of raising.
    assert tok.decode([0, 3, -1, 2]) == "a\ufffd\ufffdc"


def test_char_handles_non_ascii():
    tok = CharTokenizer.from_text(UNICODE)
    assert tok.decode(tok.encode(UNICODE)) == UNICODE


# ---- byte ---------------------------------------------------------------------------------------
def test_byte_round_trip(shakespeare):
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.bos_id is None
    for text in (shakespeare[:200_000], UNICODE, ""):
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
        assert tok.encode_array(text).tolist() == ids
    # EOS decodes to nothing, a broken UTF-8 sequence and out-of-range ids to U+FFFD.
    assert tok.decode([104, 105, 256]) == "hi"
    assert tok.decode([0xE6, 104]) == "\ufffdh"
    assert tok.decode([104, 999, 105]) == "h\ufffdi"
    # short lists of plain ids take a bytes() path, the rest numpy's: the same text for every
    # window the incremental detokeniser decodes (partial characters, EOS, bad ids, numpy ints)
    rng = np.random.default_rng(0)
    pool = list(UNICODE.encode("utf-8")) + [256, 999, -1, 0xE6, 0x80]
    for n in list(range(0, 9)) * 40 + [32, 33, 100]:
        ids = [int(v) for v in rng.choice(pool, size=n)]
        assert tok.decode(ids) == tok.decode(np.array(ids, dtype=np.int64)) == tok.decode([np.int64(v) for v in ids])


# ---- Hugging Face -------------------------------------------------------------------------------
def test_gpt2_tokenizer_json_reference_ids(gpt2):
    assert gpt2.kind == "hf" and gpt2.vocab_size == 50257
    assert gpt2.encode(FOX) == FOX_IDS and gpt2.decode(FOX_IDS) == FOX
    assert gpt2.eos_id == 50256 and gpt2.bos_id == 50256
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert gpt2.decode(gpt2.encode(UNICODE)) == UNICODE
    assert gpt2.decode([15496, 60000]) == "Hello\ufffd"


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_chunked_batch_encoding_equals_whole_text(gpt2, monkeypatch):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    # WikiText has runs of " \n" blank lines and " @-@ " tokens: hard cases for the cut points.
    wiki = SHARED / "wikitext-2-raw/wiki.valid.raw"
    text = ((read_corpus(wiki)[:150_000] if wiki.is_file() else "") + "\n\n  x \t\n 12345 a.\n\nb\r\n\r\n c"
            + read_corpus(default_corpus_path())[:50_000])
    monkeypatch.setattr(tokmod, "_CHUNK_CHARS", 800)
    assert len(tokmod._chunks(text)) > 200 and "".join(tokmod._chunks(text)) == text
    # GPT-2 (ByteLevel regex) and a Llama-3 style pipeline (Split regex + ByteLevel without regex).
    l3 = Tokenizer(models.BPE.from_file(str(GPT2_JSON.with_name("vocab.json")),
                                        str(GPT2_JSON.with_name("merges.txt"))))
    l3.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    l3.decoder = decoders.ByteLevel()
    for tok in (gpt2, HFTokenizer(l3)):
        assert tok._chunkable
        assert tok.encode_array(text).tolist() == tok.tok.encode(text, add_special_tokens=False).ids


def test_tokenizers_that_depend_on_input_boundaries_are_encoded_whole():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.BPE())
    for pre in (pre_tokenizers.Metaspace(), pre_tokenizers.ByteLevel(add_prefix_space=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                pre_tokenizers.Split(Regex(r"\S+\s*"), behavior="isolated"), pre_tokenizers.Digits()):
        t.pre_tokenizer = pre
        assert not HFTokenizer(t)._chunkable, pre
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert HFTokenizer(t)._chunkable
    t.add_special_tokens(["<a> b"])  # a special token that could straddle a cut
    assert not HFTokenizer(t)._chunkable


def test_bpe_training_gives_requested_vocab_and_round_trips(shakespeare, small_bpe):
    tok = small_bpe
    assert tok.vocab_size == 400 and tok.eos_id == 0 and tok.bos_id == 0
    held_out = shakespeare[-20_000:]
    ids = tok.encode(held_out)
    assert len(ids) < len(held_out.encode()) * 0.75  # it learned merges
    assert tok.decode(ids) == held_out
    assert tok.decode(tok.encode(UNICODE)) == UNICODE  # byte level: no unknown characters
    assert tok.encode("<|endoftext|>") == [0]
    # Deterministic: the same text trains the same vocabulary.
    assert train_bpe(shakespeare[:100_000], 400).fingerprint() == tok.fingerprint()
    assert build_tokenizer("bpe:300", shakespeare[:30_000]).vocab_size == 300


def test_bpe_training_from_files(tmp_path, shakespeare):
    (tmp_path / "a.txt").write_text(shakespeare[:30_000])
    tok = train_bpe([tmp_path / "a.txt", "some extra text"], 300)
    assert tok.vocab_size == 300 and tok.decode(tok.encode(shakespeare[:500])) == shakespeare[:500]
    with pytest.raises(ConfigError, match="at least 257"):
        train_bpe("abc", 200)


# ---- SentencePiece ------------------------------------------------------------------------------
def test_sentencepiece_mistral_round_trip(shakespeare):
    tok = load_tokenizer(need(MISTRAL))
    assert isinstance(tok, SentencePieceTokenizer) and tok.kind == "sentencepiece"
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    for text in (FOX, UNICODE, shakespeare[:20_000]):
        ids = tok.encode(text)
        assert 1 not in ids[:1] and tok.decode(ids) == text  # no BOS added by encode
    assert tok.encode("") == []
    assert tok.decode(tok.encode("Hi") + [40000]) == "Hi\ufffd"


# ---- save / load / fingerprints -----------------------------------------------------------------
def _kinds(shakespeare, small_bpe):
    out = [CharTokenizer.from_text(shakespeare), ByteTokenizer(), small_bpe]
    if GPT2_JSON.is_file():
        out.append(load_tokenizer(GPT2_JSON))
    if MISTRAL.is_file():
        out.append(load_tokenizer(MISTRAL))
    return out


def test_save_load_round_trip_every_kind(tmp_path, shakespeare, small_bpe):
    sample = shakespeare[:3000]
    fps = set()
    kinds = _kinds(shakespeare, small_bpe)
    for i, tok in enumerate(kinds):
        d = tmp_path / f"t{i}"
        tok.save(d)
        assert json.loads((d / "tokenizer_config.json").read_text())["kind"] == tok.kind
        back = load_tokenizer(d)
        assert type(back) is type(tok) and back.kind == tok.kind
        assert back.fingerprint() == tok.fingerprint() and back.vocab_size == tok.vocab_size
        assert (back.bos_id, back.eos_id) == (tok.bos_id, tok.eos_id)
        assert back.encode(sample) == tok.encode(sample)
        assert load_tokenizer(d / "tokenizer_config.json").fingerprint() == tok.fingerprint()
        fps.add(tok.fingerprint())
    assert len(fps) == len(kinds)  # all different
    assert CharTokenizer.from_text("abc").fingerprint() != CharTokenizer.from_text("abd").fingerprint()
    assert CharTokenizer.from_text("cab").fingerprint() == CharTokenizer.from_text("abc").fingerprint()


def test_load_plain_folders_and_files(tmp_path, gpt2):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_bytes(GPT2_JSON.read_bytes())
    # An HF model folder has its own tokenizer_config.json, without our "kind".
    (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 1024}')
    assert load_tokenizer(hf_dir).fingerprint() == gpt2.fingerprint()
    assert build_tokenizer(str(GPT2_JSON)).encode(FOX) == FOX_IDS
    if MISTRAL.is_file():
        sp_dir = tmp_path / "sp"
        sp_dir.mkdir()
        (sp_dir / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
        assert load_tokenizer(sp_dir).vocab_size == 32000


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FormatError, match="not found"):
        build_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FormatError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(FormatError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer_config.json").write_text('{"kind": "char"}')
    with pytest.raises(FormatError, match="chars.json"):
        load_tokenizer(tmp_path / "c")
    for spec, msg in (("bpe:abc", "bpe:<vocab_size>"), ("wordpiece", "unknown tokenizer"), ("char", "no text")):
        with pytest.raises(ConfigError, match=msg):
            build_tokenizer(spec)
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
