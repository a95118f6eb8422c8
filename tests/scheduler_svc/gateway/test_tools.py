"""Tool calling's pieces without a service: the three parsers, the request's fields and the schema that
required / named generate under, the tool-call history as templates read it, and the stream shape."""

import json

import pytest

import clients  # noqa: F401
from scheduler_svc.gateway.openai_protocol import ApiError, Choice
from scheduler_svc.gateway.structured import set_from_body
from scheduler_svc.gateway.tool_parsers import (
    ToolCall,
    parse_hermes,
    parse_llama3_json,
    parse_mistral,
    parser_for_template,
)
from scheduler_svc.gateway.tools import ToolCallsShape, parse_tool_request, template_messages, validated_messages

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_parsers():
    assert parse_hermes('Sure. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
                        '<tool_call>{"name": "g", "arguments": {}}</tool_call>') == (
        "Sure.", [ToolCall("f", '{"a": 1}'), ToolCall("g", "{}")])
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>{broken") == ("<tool_call>{broken", [])
    assert parse_llama3_json('<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}') \
        == (None, [ToolCall("f", '{"a": 1}'), ToolCall("g", "{}")])
    assert parse_llama3_json("Paris is sunny.") == ("Paris is sunny.", [])
    assert parse_mistral('[TOOL_CALLS] [{"name": "f", "arguments": "{\\"a\\": 2}"}]') == (
        None, [ToolCall("f", '{"a": 2}')])
    assert parser_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert parser_for_template("<|python_tag|>") == "llama3_json"
    assert parser_for_template(None) == "hermes"


def test_tool_request_fields_and_constraints():
    assert parse_tool_request({}, None) is None
    req = parse_tool_request({"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False}, None)
    schema = req.constraint_schema()
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert req.parse('[{"name": "get_time", "arguments": {}}]') == (None, [ToolCall("get_time", "{}")])
    named = parse_tool_request({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                     "function": {"name": "get_weather"}}}, None)
    assert named.constraint_schema() == WEATHER["function"]["parameters"]
    assert named.parse('{"city": "Oslo"}') == (None, [ToolCall("get_weather", '{"city": "Oslo"}')])
    auto = parse_tool_request({"tools": [WEATHER]}, "<|python_tag|>")
    assert auto.choice == "auto" and auto.parser == "llama3_json" and auto.constraint_schema() is None
    none = parse_tool_request({"tools": [WEATHER], "tool_choice": "none"}, None)
    assert none.parse("<tool_call>") == ("<tool_call>", [])
    bad = [({"tool_choice": "required"}, "tool_choice"),
           ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
           ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
           ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
           ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
           ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
           ({"tools": [WEATHER], "tool_call_parser": "nope"}, "tool_call_parser")]
    for body, field in bad:
        with pytest.raises(ApiError) as err:
            parse_tool_request(body, None)
        assert err.value.param == field


def test_tool_history_reaches_templates_with_object_arguments():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    out = template_messages(messages)
    assert out[1]["content"] == "" and out[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    checked = validated_messages(messages, lambda ms: [dict(m) for m in ms])
    assert checked[2]["tool_call_id"] == "call_1" and checked[1]["tool_calls"][0]["function"]["name"] == "f"
    with pytest.raises(ApiError) as err:
        template_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}])
    assert err.value.param == "messages[0].tool_calls[0].function.arguments"


class _Base:
    def whole(self, index, c):
        return {"index": index, "message": {"role": "assistant", "content": "".join(c.text)},
                "finish_reason": c.finish_reason}


class _Shape(ToolCallsShape, _Base):
    pass


def test_tool_calls_whole_and_streamed():
    shape = _Shape()
    shape.tool_request = parse_tool_request({"tools": [WEATHER]}, None)
    c = Choice(text=['<tool_call>{"name": "get_weather", ', '"arguments": {"city": "Rome"}}</tool_call>'],
               finish_reason="stop")
    body = shape.whole(0, c)
    (call,) = body["message"]["tool_calls"]
    assert body["finish_reason"] == "tool_calls" and body["message"]["content"] is None
    assert call["id"].startswith("call_") and json.loads(call["function"]["arguments"]) == {"city": "Rome"}

    class Resp:
        def __init__(self, text, reason):
            self.text, self.finish_reason = text, reason

    c = Choice()
    first = shape.chunks(0, Resp('<tool_call>{"name": "get_weather", ', 0), c)
    role, head = [ch["delta"] for ch in first]  # the header goes out as soon as the name is known
    assert role == {"role": "assistant", "content": ""}
    assert head["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert head["tool_calls"][0]["index"] == 0 and head["tool_calls"][0]["id"].startswith("call_")
    chunks = shape.chunks(0, Resp('"arguments": {"city": "Rome"}}</tool_call>', 2), c)  # 2: FINISH_REASON_STOP
    args, last = chunks
    assert args["delta"]["tool_calls"] == [{"index": 0, "function": {"arguments": '{"city": "Rome"}'}}]
    assert last["finish_reason"] == "tool_calls" and last["delta"] == {}


def test_body_constraints():
    from pagedserve.v1 import generation_pb2

    p = generation_pb2.SamplingParams()
    assert set_from_body({"structured_outputs": {"regex": "[0-9]+"}}, p) == "structured_outputs.regex"
    assert p.regex == "[0-9]+"
    p = generation_pb2.SamplingParams()
    assert set_from_body({"guided_choice": ["a", "b"]}, p) == "guided_choice" and list(p.choice.choices) == ["a", "b"]
    p = generation_pb2.SamplingParams()
    assert set_from_body({"response_format": {"type": "text"}}, p) is None and p.WhichOneof("constraint") is None
