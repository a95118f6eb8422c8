"""Streamed tool calls: each format fed piece by piece (every split point, and random token-sized pieces)
gives a header first, then argument fragments that add up to exactly the whole response's arguments;
content before a call streams without any markup; parallel calls get indexes 0, 1."""

import json
import random

import pytest

from scheduler_svc.gateway.partial_json import string_prefix, value_end
from scheduler_svc.gateway.tool_parsers import (
    ToolCall,
    named_scanner,
    parse_whole,
    scan_hermes,
    scan_llama3_json,
    scan_mistral,
    scan_required,
)
from scheduler_svc.gateway.tool_stream import ToolCallStream

HERMES_TWO = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\"", '
              '"days": [1, 2, 3], "unit": {"kind": "celsius"}}}\n</tool_call>\n'
              '<tool_call>\n{"arguments": {"tz": "Europe/Paris"}, "name": "get_time"}\n</tool_call>')
LLAMA_TWO = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "n": -12.5e2}}; '
             '{"name": "get_time", "parameters": {}}')
MISTRAL_ESCAPED = ('[TOOL_CALLS] [{"name": "say", "arguments": '
                   '"{\\"text\\": \\"caf\\u00e9 \\ud83d\\ude00 a\\\\\\\\b\\"}"}, {"name": "noop"}]')
REQUIRED = ('[{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}, '
            '{"name": "get_time", "arguments": {"timezone": "UTC"}}]')

CASES = [  # (scanner, text, content of the whole response, calls)
    (scan_hermes, HERMES_TWO, "Let me check.", [
        ToolCall("get_weather", '{"city": "Paris, \\"FR\\"", "days": [1, 2, 3], "unit": {"kind": "celsius"}}'),
        ToolCall("get_time", '{"tz": "Europe/Paris"}')]),
    (scan_llama3_json, LLAMA_TWO, None, [ToolCall("get_weather", '{"city": "Oslo", "n": -12.5e2}'),
                                         ToolCall("get_time", "{}")]),
    (scan_mistral, "Calling. " + MISTRAL_ESCAPED, "Calling.", [
        ToolCall("say", '{"text": "caf\u00e9 \U0001f600 a\\\\b"}'), ToolCall("noop", "{}")]),  # decoded
    (scan_required, REQUIRED, None, [ToolCall("get_weather", '{"city": "Rome", "unit": "celsius"}'),
                                     ToolCall("get_time", '{"timezone": "UTC"}')]),
    (named_scanner("get_time"), ' {"timezone": "Asia/Tokyo",\n "format": [24]} \n', None,
     [ToolCall("get_time", '{"timezone": "Asia/Tokyo",\n "format": [24]}')]),
]


def _pieces(text: str, mode: str) -> list[str]:
    if mode == "chars":
        return list(text)
    rng = random.Random(len(text))
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        out.append(text[i:i + k])
        i += k
    return out


def _stream(scan, pieces, max_calls=None):
    stream = ToolCallStream(scan, max_calls)
    deltas = [d for p in pieces for d in stream.feed(p)] + stream.finish()
    return stream, deltas


def _gathered(deltas):
    """content, {index: [header, fragments...]} as a client gathers them, checking the order rules."""
    content, calls = "", {}
    for d in deltas:
        if "content" in d:
            assert not calls, "content after a call"
            content += d["content"]
            continue
        (tc,) = d["tool_calls"]
        k = tc["index"]
        if k not in calls:
            assert k == len(calls) and tc["type"] == "function" and tc["id"].startswith("call_")
            assert tc["function"]["arguments"] == "" and tc["function"]["name"]
            calls[k] = [tc["function"]["name"]]
        else:
            assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            assert tc["function"]["arguments"]
            calls[k].append(tc["function"]["arguments"])
    return content, calls


@pytest.mark.parametrize("mode", ["chars", "tokens"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fragments_add_up_to_the_whole_arguments(case, mode):
    scan, text, content, expected = CASES[case]
    assert parse_whole(scan, text) == (content, expected)
    stream, deltas = _stream(scan, _pieces(text, mode))
    got_content, calls = _gathered(deltas)
    assert stream.has_calls and got_content == (content or "")
    assert sorted(calls) == list(range(len(expected)))  # parallel calls: indexes 0, 1
    for k, call in enumerate(expected):
        name, *fragments = calls[k]
        assert name == call.name and "".join(fragments) == call.arguments
        assert isinstance(json.loads("".join(fragments)), dict)
        if k == 0 and mode == "chars":  # its name comes before its arguments (the second hermes call's not)
            assert len(fragments) > 1, "arguments sent in one piece"
    assert "<tool_call>" not in got_content and "[TOOL_CALLS]" not in got_content


def test_header_goes_out_when_the_name_closes():
    stream = ToolCallStream(scan_hermes)
    assert stream.feed("Hi <tool_") == [{"content": "Hi"}]  # the tag's start is held back
    assert stream.feed('call>{"name": "get_') == []
    head, args = stream.feed('time", "arguments": {"t')
    assert head["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": '{"t'}}]}
    assert stream.feed("z") == [{"tool_calls": [{"index": 0, "function": {"arguments": "z"}}]}]


@pytest.mark.parametrize("scan, text", [
    (scan_hermes, "Plain answer: 3 < 4 and <tool is no tag.  "),
    (scan_hermes, "<tool_call>{broken"),
    (scan_llama3_json, "  The weather is fine."),
    (scan_llama3_json, '{"answer": 42}'),  # JSON, but no call: content
    (scan_mistral, "[TOOL_CALLS] not json"),
])
def test_text_that_is_not_the_format_streams_as_content(scan, text):
    for mode in ("chars", "tokens"):
        stream, deltas = _stream(scan, _pieces(text, mode))
        assert not stream.has_calls and "".join(d["content"] for d in deltas) == text
        assert parse_whole(scan, text) == (text, [])


def test_one_call_without_parallel_tool_calls():
    stream, deltas = _stream(scan_hermes, list(HERMES_TWO), max_calls=1)
    _, calls = _gathered(deltas)
    assert list(calls) == [0] and parse_whole(scan_hermes, HERMES_TWO, 1)[1] == CASES[0][3][:1]


def test_a_call_cut_by_max_tokens_ends_with_what_it_had():
    text = HERMES_TWO[:80]
    stream, deltas = _stream(scan_hermes, list(text))
    _, calls = _gathered(deltas)
    assert stream.has_calls and "".join(calls[0][1:]) == text[text.index('{"city'):]
    assert parse_whole(scan_hermes, text) == (text, [])  # the whole response gives the text as content


def test_partial_json_helpers():
    assert value_end('{"a": "}"} x', 0) == 10 and value_end('{"a": [1, "]"', 0) is None
    assert value_end("12", 0) is None and value_end("12,", 0) == 2
    assert string_prefix("caf\\u00") == "caf" and string_prefix("a\\ud83d") == "a"
    assert string_prefix("a\\ud83d\\") == "a" and string_prefix("a\\ud83d\\ude00") == "a\U0001f600"
    assert string_prefix("x\\q") is None


@pytest.mark.parametrize("scan, wrap", [
    (scan_required, lambda args: '[{"name": "write", "arguments": ' + args + "}]"),
    (scan_mistral, lambda args: '[TOOL_CALLS] [{"name": "write", "arguments": ' + json.dumps(args) + "}]"),
])
def test_long_arguments_stream_in_linear_time(scan, wrap):
    """A rescan resumes where the last one stopped (partial_json's memo): 36,000 characters of arguments
    in 4-character pieces take well under a second (starting over at every piece: 9 s on a 2-core box)."""
    import time

    args = json.dumps({"content": 'line "quoted" caf\u00e9 \\ end\n' * 1200, "n": list(range(300))}, ensure_ascii=False)
    text = wrap(args)
    t0 = time.perf_counter()
    stream, deltas = _stream(scan, [text[i:i + 4] for i in range(0, len(text), 4)])
    seconds = time.perf_counter() - t0
    _, calls = _gathered(deltas)
    assert "".join(calls[0][1:]) == args and len(calls[0]) > 1000
    assert seconds < 5, seconds
