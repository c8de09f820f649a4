"""Text out of a token stream (infer/text.py): incremental detokenisation and stop strings, as
every front end gets them through the generator."""

from __future__ import annotations

from collections.abc import Sequence

from tritlm.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer
from tritlm.infer.text import IncrementalDetokenizer, StopStrings, bad_word_ids


# ---- incremental detokenisation ------------------------------------------------------------------
def _deltas(tok, ids: Sequence[int], prompt: Sequence[int] = ()) -> list[str]:
    d = IncrementalDetokenizer(tok, prompt)
    out = [d.add(t) for t in ids]
    out.append(d.flush())
    return out


def test_detokenizer_bytes_holds_back_partial_characters():
    tok = ByteTokenizer()
    text = "héllo, 日本語 🙂!"
    parts = _deltas(tok, tok.encode(text), tok.encode("prompt "))
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)  # never emits half a character


def test_detokenizer_flush_emits_incomplete_tail_as_replacement():
    tok = ByteTokenizer()
    ids = tok.encode("ab日")[:-1]  # cut inside the 3-byte character
    parts = _deltas(tok, ids)
    assert "".join(parts[:-1]) == "ab"
    assert parts[-1] == "\ufffd"


def test_detokenizer_byte_level_bpe_matches_full_decode():
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé wörds, 東京 and more words. " * 20
    tok = HFTokenizer.train_bpe(text, vocab_size=300)
    ids = tok.encode("Über die Brücke: the fox said 東京 twice, twice.")
    assert "".join(_deltas(tok, ids, tok.encode("Prompt:"))) == tok.decode(ids)


# ---- stop strings --------------------------------------------------------------------------------
def test_stop_matcher_across_chunks():
    m = StopStrings(["\nUser:"])
    assert m.feed("Hello") == ("Hello", False)
    assert m.feed(" there\nUs") == (" there", False)  # "\nUs" may start the stop string: held back
    assert m.feed("er: next") == ("", True)


def test_stop_matcher_releases_false_alarm_and_picks_earliest():
    m = StopStrings(["abc", "xy"])
    assert m.feed("za") == ("z", False)
    assert m.feed("b!") == ("ab!", False)  # "ab!" is not "abc": released
    m2 = StopStrings(["world", "lo w"])
    assert m2.feed("hello world") == ("hel", True)  # the earliest match wins
    m3 = StopStrings([])
    assert m3.feed("anything") == ("anything", False)


def test_stop_matcher_flush_returns_held_text():
    m = StopStrings(["STOP"])
    assert m.feed("go ST") == ("go ", False)
    assert m.flush() == "ST"


def test_stop_strings_hold_back_partial_matches():
    st = StopStrings(["\n\n", "END"])
    assert st.feed("hello EN") == ("hello ", False)
    assert st.feed("DING") == ("", True)
    st = StopStrings(["\n\n"])
    assert st.feed("a\nb") == ("a\nb", False)
    assert st.feed("\n") == ("", False) and st.flush() == "\n"


def test_bad_word_ids_cover_both_spellings():
    tok = CharTokenizer.from_text("abc ")
    assert bad_word_ids(tok, ["ab", ""]) == (tuple(tok.encode("ab")), tuple(tok.encode(" ab")))
    assert bad_word_ids(CharTokenizer.from_text("abc"), ["ab"]) == (tuple(CharTokenizer.from_text("abc").encode("ab")),)
