"""JSON text that is still arriving: where a value ends once it is complete, and what a string literal
decodes to so far. Only the structure is followed (strings, escapes, nesting); ``json.loads`` checks a
value once it is complete. The tool-call parsers (tool_parsers.py) read a model's calls with these while
the text streams in, so the same code serves whole responses and streams.

Every "so far" answer only grows as text is appended: a decoded string prefix stops before an escape
that is incomplete or before a high surrogate whose low half may follow (they would decode to one
character), so a later answer always starts with an earlier one.
"""

from __future__ import annotations

import json
import re

WHITESPACE = " \t\n\r"
# A stream rescans its text after every piece, so the scans jump with regular expressions (C speed)
# from one structural character to the next instead of stepping through every character.
_QUOTE_OR_ESCAPE = re.compile(r'["\\]')
_STRUCTURE = re.compile(r'["{}\[\]]')
_SCALAR_END = re.compile(r"[,}\]\s]")


def skip_ws(text: str, i: int, chars: str = WHITESPACE) -> int:
    n = len(text)
    while i < n and text[i] in chars:
        i += 1
    return i


def string_end(text: str, i: int, memo: dict | None = None) -> int | None:
    """Index past the string literal opening at ``text[i]`` (a quote); None while it is open.
    ``memo``: as value_end's (an open string's rescan resumes where the last one stopped)."""
    j = memo.get(("string_end", i), i + 1) if memo is not None else i + 1
    while (m := _QUOTE_OR_ESCAPE.search(text, j)) is not None:
        if m.group() == '"':
            return m.end()
        if m.end() >= len(text):  # a backslash whose escaped character has not come
            j = m.start()
            break
        j = m.end() + 1
    else:
        j = len(text)
    if memo is not None:
        memo[("string_end", i)] = j
    return None


def value_end(text: str, i: int, memo: dict | None = None) -> int | None:
    """Index past the JSON value starting at ``text[i]``; None while it is incomplete. A number or
    literal is complete only once a delimiter follows it (more digits could come). ``memo``: kept by
    the caller across scans of one text that only grows (a stream's), so that a rescan of an open
    object or list resumes where the last one stopped instead of starting over."""
    n = len(text)
    if i >= n:
        return None
    c = text[i]
    if c == '"':
        return string_end(text, i, memo)
    if c in "{[":
        depth, j = memo.get(("value", i), (0, i)) if memo is not None else (0, i)
        while (m := _STRUCTURE.search(text, j)) is not None:
            j, c = m.start(), m.group()
            if c == '"':
                end = string_end(text, j, memo)
                if end is None:
                    break  # resume at this string's opening quote
                j = end
                continue
            depth += 1 if c in "{[" else -1
            if depth == 0:
                return j + 1
            j += 1
        else:
            j = n
        if memo is not None:
            memo[("value", i)] = (depth, j)
        return None
    m = _SCALAR_END.search(text, i)
    return m.start() if m else None


def string_prefix(raw: str, memo: dict | None = None, key=None) -> str | None:
    """The decoded text of a string literal's first characters ``raw`` (after the opening quote, before
    the closing one if it came), cut so that appending text only appends to the answer; None when an
    escape is malformed. ``memo`` and ``key``: as value_end's (the decoding resumes at the last cut,
    which is never inside an escape nor right after a high surrogate, so the parts decode alone)."""
    done, decoded = memo.get(("string", key), (0, "")) if memo is not None else (0, "")
    i, cut, high_at = done, len(raw), None
    while i < len(raw):
        if raw[i] != "\\":
            k = raw.find("\\", i)
            i = len(raw) if k < 0 else k
            high_at = None
            continue
        size = 6 if raw[i + 1:i + 2] == "u" else 2
        if i + size > len(raw):
            cut = i
            break
        high_at = None
        if size == 6:
            try:
                code = int(raw[i + 2:i + 6], 16)
            except ValueError:
                return None
            high_at = i if 0xD800 <= code <= 0xDBFF else None
        i += size
    if high_at is not None and high_at + 6 == cut:
        cut = high_at  # "\ud83d" may pair with the next escape into one character
    try:
        decoded += json.loads('"' + raw[done:cut] + '"')
    except json.JSONDecodeError:
        return None
    if memo is not None:
        memo[("string", key)] = (cut, decoded)
    return decoded
