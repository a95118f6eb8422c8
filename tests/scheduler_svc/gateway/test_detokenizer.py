"""Incremental detokenization is exact (the deltas add up to tokenizer.decode of all ids) for byte-level
BPE and for sentencepiece-style byte fallback, through the window decoder and through tokenizers'
DecodeStream (byte-level), which emit the same deltas; stop strings are never emitted, not even in part."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from scheduler_svc.gateway.detokenizer import IncrementalDetokenizer, StopStrings, byte_fallback_ids
from scheduler_svc.gateway.tokenizer import Tokenizer
from tests.factories import make_checkpoint

MULTILINGUAL = "Hello café 日本語 😀 🚀 naïve Ελλάδα привет 👍🏽 ❤️ x"


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory) -> Tokenizer:
    """The demo checkpoint's byte-level BPE (its pieces split multi-byte characters)."""
    return Tokenizer(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama"))


def _byte_fallback_tokenizer() -> HFTokenizer:
    """A sentencepiece-like tokenizer: "▁" for spaces, <0xNN> byte tokens, one leading space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁Hello": 4, "▁world": 5, "ab": 6, "x": 7, "▁日": 8}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


BYTE_FALLBACK = _byte_fallback_tokenizer()
BYTE_TOKEN_IDS = byte_fallback_ids(BYTE_FALLBACK.id_to_token, BYTE_FALLBACK.get_vocab_size())


def byte_fallback_decode(ids: list[int]) -> str:
    return BYTE_FALLBACK.decode(ids, skip_special_tokens=True)


def stream(decode, ids: list[int], byte_token_ids=frozenset(), backend=None) -> list[str]:
    """The deltas of a whole stream, the flush last."""
    detok = IncrementalDetokenizer(decode, byte_token_ids, backend)
    return [detok.add(t) for t in ids] + [detok.flush()]


def both(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The deltas through DecodeStream, checked equal, delta by delta, to the window decoder's."""
    streamed = stream(tokenizer.decode, ids, backend=tokenizer.backend)
    assert streamed == stream(tokenizer.decode, ids)
    return streamed


def test_byte_level_vocabularies_use_decode_stream(demo_tokenizer):
    assert IncrementalDetokenizer(demo_tokenizer.decode, backend=demo_tokenizer.backend).streaming
    assert not IncrementalDetokenizer(demo_tokenizer.decode).streaming
    assert not IncrementalDetokenizer(byte_fallback_decode, BYTE_TOKEN_IDS, BYTE_FALLBACK).streaming


def test_multibyte_characters_are_emitted_whole(demo_tokenizer):
    ids = demo_tokenizer.encode(MULTILINGUAL)
    deltas = both(demo_tokenizer, ids)
    assert "".join(deltas) == MULTILINGUAL == demo_tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_special_tokens_are_skipped_by_both_decoders(demo_tokenizer):
    from gpu_worker.demo_model import BOS_ID, EOS_ID

    ids = demo_tokenizer.encode("hello") + [EOS_ID] + demo_tokenizer.encode(" café") + [BOS_ID]
    assert "".join(both(demo_tokenizer, ids)) == "hello café" == demo_tokenizer.decode(ids)


def byte_level_ids(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """One base token per byte: byte-level BPE maps bytes to characters as GPT-2 does."""
    direct = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in direct]
    chars = {b: chr(b) for b in direct} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = tokenizer._tok.get_vocab()
    return [vocab[chars[b]] for b in data]


def test_a_character_split_over_byte_tokens_waits_for_its_last_byte(demo_tokenizer):
    ids = byte_level_ids(demo_tokenizer, "日x".encode())  # E6 97 A5 78
    assert demo_tokenizer.decode(ids) == "日x"
    assert both(demo_tokenizer, ids) == ["", "", "日", "x", ""]


def test_invalid_bytes_at_the_end_are_flushed(demo_tokenizer):
    ids = demo_tokenizer.encode("ab") + byte_level_ids(demo_tokenizer, b"\xe6")  # a lone lead byte
    deltas = both(demo_tokenizer, ids)
    assert deltas[-2:] == ["", "\ufffd"]
    assert "".join(deltas) == demo_tokenizer.decode(ids) == "ab\ufffd"


def test_invalid_bytes_inside_the_text_are_emitted_when_followed(demo_tokenizer):
    ids = byte_level_ids(demo_tokenizer, b"a\xe6\x97b\xff c")  # a truncated character, a byte never valid
    assert "".join(both(demo_tokenizer, ids)) == demo_tokenizer.decode(ids) == "a\ufffdb\ufffd c"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 999), max_size=40))
def test_deltas_add_up_to_the_full_decode_byte_level(demo_tokenizer, ids):
    assert "".join(both(demo_tokenizer, ids)) == demo_tokenizer.decode(ids)


def test_decode_stream_refusing_hands_over_to_the_window_decoder():
    """Given a byte-fallback vocabulary without its byte tokens named, DecodeStream emits a byte that a
    longer run then turns into U+FFFD, and refuses the longer decode; the window decoder, in the same
    state, would hold the text back at that token too: from there on the two emit the same."""
    vocab = BYTE_FALLBACK.get_vocab()
    ids = [vocab["▁Hello"], vocab["<0x00>"], vocab["<0x80>"], vocab["x"], vocab["▁world"]]
    detok = IncrementalDetokenizer(byte_fallback_decode, backend=BYTE_FALLBACK)
    assert detok.streaming
    deltas = [detok.add(t) for t in ids]
    assert not detok.streaming  # it refused at "x", whose decode no longer starts with "Hello\x00"
    assert deltas + [detok.flush()] == stream(byte_fallback_decode, ids)  # the window decoder's own deltas
    assert deltas[:2] == ["Hello", "\x00"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, BYTE_FALLBACK.get_vocab_size() - 1), max_size=40))
def test_deltas_add_up_to_the_full_decode_byte_fallback(ids):
    assert "".join(stream(byte_fallback_decode, ids, BYTE_TOKEN_IDS)) == byte_fallback_decode(ids)


def test_byte_fallback_leading_space_and_split_character():
    vocab = BYTE_FALLBACK.get_vocab()
    ids = [vocab["▁Hello"], vocab["▁"], vocab["<0xE6>"], vocab["<0x97>"], vocab["<0xA5>"], vocab["▁world"]]
    assert stream(byte_fallback_decode, ids, BYTE_TOKEN_IDS) == ["Hello", " ", "", "", "", "日 world", ""]


def test_byte_fallback_run_that_turns_invalid_is_held_back():
    # NUL alone decodes to "\x00", but the run <0x00><0x80> is invalid: both bytes become U+FFFD.
    vocab = BYTE_FALLBACK.get_vocab()
    ids = [vocab["<0x00>"], vocab["<0x80>"], vocab["x"]]
    assert byte_fallback_decode(ids) == "\ufffd\ufffdx"
    assert stream(byte_fallback_decode, ids, BYTE_TOKEN_IDS) == ["", "", "\ufffd\ufffdx", ""]
    assert len(BYTE_TOKEN_IDS) == 256


# ---- stop strings


def run_stops(stops, deltas) -> tuple[str, bool]:
    s = StopStrings(stops)
    out = []
    for d in deltas:
        text, hit = s.add(d)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + s.flush(), False


def test_stop_string_across_deltas_is_not_emitted():
    s = StopStrings(["o w"])
    assert s.add("Hel") == ("Hel", False)
    assert s.add("lo") == ("l", False)  # "o" might start "o w"
    assert s.add(" wor") == ("", True)


def test_held_prefix_is_released_when_it_does_not_match():
    s = StopStrings(["abc"])
    assert s.add("xab") == ("x", False)
    assert s.add("d") == ("abd", False)
    assert s.add("ab") == ("", False)
    assert s.flush() == "ab"


def test_earliest_stop_string_wins():
    assert run_stops(["world", "lo"], ["hello world"]) == ("hel", True)
    assert run_stops(["b", "ab"], ["xa", "b"]) == ("x", True)


def test_no_stop_strings_pass_text_through():
    assert StopStrings([]).add("anything") == ("anything", False)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc ", max_size=30),
    stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_strings_match_a_plain_search(text, stops, cuts):
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    # Generation ends at the first delta that completes a stop string; the text ends before the
    # earliest stop string complete by then.
    expected = (text, False)
    for end in bounds[1:]:
        hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if hits:
            expected = (text[: min(hits)], True)
            break
    assert run_stops(stops, deltas) == expected
