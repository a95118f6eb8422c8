"""Tool-call parsers: a model's output -> content and calls, one per format that the families we serve are
trained on. Chosen from the chat template (the markers it spells) unless named.

- ``hermes`` (Qwen 2/2.5/3, Hermes, SmolLM3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  repeated; text before the first tag is content.
- ``llama3_json`` (Llama 3.1/3.2/3.3): ``{"name": ..., "parameters": {...}}``, optionally after
  ``<|python_tag|>``, several joined by ``;``.
- ``mistral`` (Mistral/Mixtral v0.3+): ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``.

Each parser is a *scan* of the text so far (``final`` once the choice ended): the content that is
certain, and each call's name (once its string closed) and arguments text so far. Streams scan after
every piece and send what grew (tool_stream.py); a whole response is the final scan, so both spell
the same calls. A call's arguments are the model's own JSON text of the value (a JSON string holding
the arguments, as Mistral models may write, is decoded), not a re-serialization: a stream can send
them as they come and its fragments add up to exactly the whole response's text.

Output that does not parse as the format is plain content (no tool call), as vLLM's parsers do.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler_svc.gateway.partial_json import skip_ws, string_end, string_prefix, value_end

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
_ARGS_KEYS = ("arguments", "parameters")


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass(slots=True)
class PartialCall:
    name: str | None = None  # once the name's string closed
    arguments: str = ""  # the arguments' JSON text so far; later scans only append to it
    done: bool = False  # the call's object closed
    valid: bool = True  # done, and a call: a string name, arguments that are a JSON object


@dataclass(slots=True)
class Scan:
    content: str  # content so far; later scans only append to it
    calls: list[PartialCall] = field(default_factory=list)
    parsed: bool = False  # the whole text is the format with these calls (what a final scan decides)


Scanner = Callable[..., Scan]  # (text, final, memo=None): memo as partial_json.value_end's


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments(text: str, span: tuple[int, int | None] | None, done: bool, memo: dict | None) -> str | None:
    if span is None:
        return "{}" if done else ""  # a call without arguments takes none
    start, end = span
    if text[start] != '"':
        return text[start:end] if end is not None else text[start:]
    if end is not None:  # JSON text inside a JSON string
        try:
            return json.loads(text[start:end])
        except json.JSONDecodeError:
            return None
    return string_prefix(text[start + 1:], memo, start)


def _string(text: str, start: int, end: int) -> str | None:
    """The string literal text[start:end]; None when it is another value or malformed."""
    if text[start] != '"':
        return None
    try:
        return json.loads(text[start:end])
    except json.JSONDecodeError:
        return None


def _check(call: PartialCall, text: str, start: int, end: int) -> None:
    try:
        json.loads(text[start:end])
        call.valid = call.name is not None and isinstance(json.loads(call.arguments), dict)
    except json.JSONDecodeError:
        call.valid = False


def scan_call(text: str, i: int, memo: dict | None = None) -> tuple[PartialCall, int | None]:
    """The call object opening at ``text[i]`` (a brace): its name and arguments so far; the index past
    it once it closed, else None (still open, or not a call object: then ``valid`` is False)."""
    call, span, n, j = PartialCall(), None, len(text), i + 1
    while True:
        j = skip_ws(text, j)
        if j >= n:
            break
        if text[j] == "}":
            call.done = True
            break
        if text[j] == ",":  # json.loads checks the punctuation once the object closed
            j += 1
            continue
        key_end = string_end(text, j) if text[j] == '"' else None
        if key_end is None:
            call.valid = text[j] == '"'
            break
        key = _string(text, j, key_end)
        j = skip_ws(text, key_end)
        if j >= n:
            break
        if text[j] != ":":
            call.valid = False
            break
        j = skip_ws(text, j + 1)
        if j >= n:
            break
        end = value_end(text, j, memo)
        if key == "name" and end is not None:
            call.name = _string(text, j, end)
        if key in _ARGS_KEYS and span is None:
            span = (j, end)
        if end is None:
            break
        j = end
    arguments = _arguments(text, span, call.done, memo)
    call.arguments = arguments if arguments is not None else ""
    if arguments is None:
        call.valid = False
    if not call.done:
        return call, None
    _check(call, text, i, j + 1)
    return call, j + 1


def _held(text: str, marker: str) -> str:
    """Streamed content less what may yet prove to start the marker (a tail that begins it) and the
    whitespace before that: the whole response drops whitespace between content and calls."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            text = text[:-k]
            break
    return text.rstrip()


def scan_hermes(text: str, final: bool, memo: dict | None = None) -> Scan:
    start = text.find(HERMES_OPEN)
    if start < 0:
        return Scan(text if final else _held(text, HERMES_OPEN))
    scan, pos = Scan(text[:start].rstrip()), start
    while pos >= 0:
        j = skip_ws(text, pos + len(HERMES_OPEN))
        if j >= len(text) or text[j] != "{":
            return scan
        call, end = scan_call(text, j, memo)
        scan.calls.append(call)
        if end is None or not call.valid:
            return scan
        k = skip_ws(text, end)
        if k < len(text) and not text.startswith(HERMES_CLOSE, k):
            return scan
        pos = text.find(HERMES_OPEN, end)  # text between calls is dropped
    scan.parsed = True
    return scan


def scan_llama3_json(text: str, final: bool, memo: dict | None = None) -> Scan:
    i = skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, i):
        i = skip_ws(text, i + len(PYTHON_TAG))
    elif not final and PYTHON_TAG.startswith(text[i:]):
        return Scan("")  # undecided: the tag may be arriving
    if i >= len(text) and not final:
        return Scan("")
    if i >= len(text) or text[i] != "{":
        return Scan(text)  # plain content, streamed as it comes
    scan = Scan("")
    while True:
        call, end = scan_call(text, i, memo)
        scan.calls.append(call)
        if end is None or not call.valid:
            return scan
        i = skip_ws(text, end, " \n\t\r;")
        if i >= len(text):
            break
        if text[i] != "{":
            return scan
    scan.parsed = True
    return scan


def scan_call_list(text: str, i: int, memo: dict | None = None) -> tuple[list[PartialCall], bool]:
    """Calls in the JSON list at ``text[i:]`` (or one call object), and whether the rest of the text is
    exactly that list, complete, of valid calls."""
    i = skip_ws(text, i)
    if i < len(text) and text[i] == "{":
        call, end = scan_call(text, i, memo)
        return [call], end is not None and call.valid and skip_ws(text, end) == len(text)
    if i >= len(text) or text[i] != "[":
        return [], False
    calls, j = [], i + 1
    while True:
        j = skip_ws(text, j)
        if j >= len(text):
            return calls, False
        if text[j] == "]":
            break
        if text[j] == ",":
            j += 1
            continue
        if text[j] != "{":
            return calls, False
        call, end = scan_call(text, j, memo)
        calls.append(call)
        if end is None or not call.valid:
            return calls, False
        j = end
    if not calls or skip_ws(text, j + 1) != len(text):
        return calls, False
    try:
        json.loads(text[i:j + 1])
    except json.JSONDecodeError:
        return calls, False
    return calls, True


def scan_mistral(text: str, final: bool, memo: dict | None = None) -> Scan:
    start = text.find(MISTRAL_MARK)
    if start < 0:
        return Scan(text if final else _held(text, MISTRAL_MARK))
    calls, parsed = scan_call_list(text, start + len(MISTRAL_MARK), memo)
    return Scan(text[:start].rstrip(), calls, parsed)


def scan_required(text: str, final: bool, memo: dict | None = None) -> Scan:
    """tool_choice required: the output is a JSON list of calls (generated under its schema)."""
    calls, parsed = scan_call_list(text, 0, memo)
    return Scan("", calls, parsed)


def named_scanner(name: str) -> Scanner:
    """A named function: the output is its arguments object (generated under its parameters schema)."""

    def scan(text: str, final: bool, memo: dict | None = None) -> Scan:
        arguments = text.strip()  # while streaming: trailing whitespace waits for what follows it
        try:
            parsed = isinstance(json.loads(arguments), dict)
        except json.JSONDecodeError:
            parsed = False  # cut by max_tokens
        return Scan("", [PartialCall(name, arguments, parsed, parsed)], parsed)

    return scan


def scan_none(text: str, final: bool, memo: dict | None = None) -> Scan:
    return Scan(text, [], True)


def parse_whole(scan: Scanner, text: str, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) of a finished output; the text as content when it is not the format."""
    result = scan(text, True)
    if not result.parsed or not result.calls:
        return text, []
    calls = result.calls[:max_calls]
    return result.content or None, [ToolCall(c.name, c.arguments) for c in calls]


SCANNERS: dict[str, Scanner] = {"hermes": scan_hermes, "llama3_json": scan_llama3_json, "mistral": scan_mistral}
PARSERS = SCANNERS  # the names --tool-call-parser takes


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    return parse_whole(scan_hermes, text)


def parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    return parse_whole(scan_llama3_json, text)


def parse_mistral(text: str) -> tuple[str | None, list[ToolCall]]:
    return parse_whole(scan_mistral, text)


def parser_for_template(source: str | None) -> str:
    """The parser a chat template's markers point at; hermes (the most common format) otherwise."""
    source = source or ""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3_json"
    return "hermes"
