"""The text side of one sample in the gateway: incremental detokenization and stop strings.

``IncrementalDetokenizer`` turns token ids into text deltas whose concatenation equals
``tokenizer.decode(all_ids)``. Decoding a token alone is wrong in general: byte-level BPE pieces and
byte-fallback tokens carry parts of a UTF-8 character, and some decoders treat a leading space
differently at the start of a text. So each step decodes a short window of ids twice, once without
and once with the new ids, and emits the difference; text that ends in U+FFFD (an incomplete UTF-8
sequence so far) is held back until the character completes.

Invariant: the window starts at ``prefix_offset``, and ``read_offset`` is where the emitted text ends;
both are token positions at which everything before decodes to complete characters, and lossy UTF-8
decoding is concatenative at such boundaries, so the deltas add up to the full decode. ``flush`` closes
the stream with one full decode, which emits what is still held back (a genuinely invalid byte at
the very end) and double-checks the invariant.

Sentencepiece-style byte fallback (``<0xE6>`` tokens) needs one more rule: its decoder turns a run of
byte tokens that is not valid UTF-8 into one U+FFFD per byte, even bytes that looked complete before
the run went on, so text ending in a byte token is held back until a regular token ends the run
(skipped special tokens between byte tokens do not end it: they are removed before decoding).

Where the vocabulary has no byte-fallback tokens (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM...) and a
``tokenizers.Tokenizer`` is given, the work per token is done by ``tokenizers``' own streaming decoder
(``DecodeStream``, Rust), which follows the same rule with the same offsets: on each emitted delta its
window starts where the previous delta ended. It differs where decoding is not concatenative: where a
longer decode no longer starts with the text already emitted (a byte-fallback run that turns invalid,
which is why byte-fallback vocabularies stay on the window decoder, or a decoder quirk), it raises
instead of waiting; the window decoder then takes over from the same offsets for the rest of the stream.

``StopStrings`` holds back any tail that could be the start of a stop string, so a stop string is never
emitted, not even in part, and finds the earliest stop string across token boundaries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

try:
    from tokenizers.decoders import DecodeStream  # tokenizers >= 0.21
except ImportError:  # an older tokenizers: the window decoder alone
    DecodeStream = None

REPLACEMENT_CHAR = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

Decode = Callable[[list[int]], str]


def byte_fallback_ids(id_to_token: Callable[[int], str | None], vocab_size: int) -> frozenset[int]:
    """Ids of byte-fallback tokens (``<0xNN>``) of a vocabulary; empty for byte-level BPE."""
    return frozenset(i for i in range(vocab_size) if _BYTE_TOKEN.fullmatch(id_to_token(i) or ""))


class IncrementalDetokenizer:
    def __init__(self, decode: Decode, byte_token_ids: frozenset[int] = frozenset(), backend=None) -> None:
        """``decode``: ids -> text, skipping special tokens; ``backend``: the ``tokenizers.Tokenizer``
        behind it, for the streaming decoder (None: the window decoder only)."""
        self._decode = decode
        self._byte_token_ids = byte_token_ids
        self._backend = backend
        use_stream = backend is not None and not byte_token_ids and DecodeStream is not None
        self._stream = DecodeStream(skip_special_tokens=True) if use_stream else None
        self._in_byte_run = False  # the last tokens that decode to something are byte tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # first token of the decode window
        self.read_offset = 0  # tokens before this are emitted as text
        self._emitted: list[str] = []
        self.exact = True  # False if flush found the deltas diverged from the full decode

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self._emitted)

    @property
    def streaming(self) -> bool:
        """Whether tokenizers' DecodeStream does the work (else the window decoder)."""
        return self._stream is not None

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text that is now final (possibly empty)."""
        self.token_ids.append(token_id)
        if self._stream is not None:
            try:
                delta = self._stream.step(self._backend, token_id)
            except Exception:  # tokenizers' "invalid prefix": a longer decode changed emitted text
                self._stream = None  # the window decoder goes on from the same offsets
                return self._add_window()
            if delta is None:
                return ""
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
            self._emitted.append(delta)
            return delta
        if token_id in self._byte_token_ids:
            self._in_byte_run = True
            return ""  # a byte-fallback run may still turn invalid; wait for a regular token
        if self._in_byte_run:
            if not self._decode([token_id]):
                return ""  # a skipped special token does not end the run
            self._in_byte_run = False
        return self._add_window()

    def _add_window(self) -> str:
        ids = self.token_ids
        prefix_text = self._decode(ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(ids[self.prefix_offset :])
        if (
            len(new_text) <= len(prefix_text)
            or new_text.endswith(REPLACEMENT_CHAR)
            or not new_text.startswith(prefix_text)
        ):
            return ""  # an incomplete character (or a decoder quirk): wait for more tokens
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(ids)
        self._emitted.append(delta)
        return delta

    def flush(self) -> str:
        """Ends the stream: returns what is left so that the deltas add up to the full decode."""
        full = self._decode(self.token_ids)
        emitted = self.text
        if not full.startswith(emitted):
            self.exact = False  # cannot happen for byte-level or byte-fallback decoders
            return ""
        rest = full[len(emitted) :]
        if rest:
            self._emitted.append(rest)
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return rest


class StopStrings:
    """Finds stop strings in a stream of text deltas and holds back possible beginnings of one."""

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        """``include``: the text emitted at a hit ends with the stop string (vLLM's include_stop_str_in_output)."""
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self.include = include
        self._longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""  # text received but not yet released

    def add(self, text: str) -> tuple[str, bool]:
        """Takes a delta; returns (text to emit, whether a stop string ended the stream).

        After a hit the returned text ends just before the earliest stop string and the stream is over.
        """
        if not self.stops:
            return text, False
        self.pending += text
        # Only pending text can hold a stop string: emitted text never ends in a stop string's prefix.
        hits = [(i, -len(s)) for s, i in ((s, self.pending.find(s)) for s in self.stops) if i >= 0]
        if hits:
            at, minus_len = min(hits)  # the earliest stop string; the longest of those starting there
            out = self.pending[: at - minus_len if self.include else at]
            self.pending = ""
            return out, True
        keep = self._held_suffix_len()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Ends the stream without a stop string: releases what was held back."""
        out, self.pending = self.pending, ""
        return out

    def _held_suffix_len(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of some stop string."""
        p = self.pending
        for k in range(min(len(p), self._longest - 1), 0, -1):
            tail = p[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
