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

WHITESPACE = " \t\n\r"


def skip_ws(text: str, i: int, chars: str = WHITESPACE) -> int:
    n = len(text)
    while i < n and text[i] in chars:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """Index past the string literal opening at ``text[i]`` (a quote); None while it is open."""
    j, n = i + 1, len(text)
    while j < n:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index past the JSON value starting at ``text[i]``; None while it is incomplete. A number or
    literal is complete only once a delimiter follows it (more digits could come)."""
    n = len(text)
    if i >= n:
        return None
    c = text[i]
    if c == '"':
        return string_end(text, i)
    if c in "{[":
        depth, j = 0, i
        while j < n:
            c = text[j]
            if c == '"':
                j = string_end(text, j)
                if j is None:
                    return None
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < n and text[j] not in ",}]" + WHITESPACE:
        j += 1
    return j if j < n else None


def string_prefix(raw: str) -> str | None:
    """The decoded text of a string literal's first characters ``raw`` (after the opening quote, before
    the closing one if it came), cut so that appending text only appends to the answer; None when an
    escape is malformed."""
    i, cut, high_at = 0, len(raw), None
    while i < len(raw):
        if raw[i] != "\\":
            i += 1
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
        return json.loads('"' + raw[:cut] + '"')
    except json.JSONDecodeError:
        return None
