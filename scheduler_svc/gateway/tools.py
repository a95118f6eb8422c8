"""Tool calling on /v1/chat/completions: ``tools``, ``tool_choice`` and ``parallel_tool_calls`` in the
request, tool-call history in the messages, and OpenAI ``tool_calls`` in the response.

- The tools and the history reach the model's chat template as transformers' ``apply_chat_template``
  passes them (``tools`` as a list of ``{"type": "function", "function": {...}}``; an assistant
  message's ``tool_calls`` with their ``arguments`` as objects, as the templates read them).
- ``tool_choice`` ``"auto"``: the model writes freely and the family's parser (tool_parsers.py) finds
  its calls. ``"required"``: the output is generated under a JSON schema of a list of calls
  (``[{"name": <one of the tools>, "arguments": <its parameters>}]``, one item unless
  ``parallel_tool_calls``); a named function: under that function's parameters schema, the output being
  its arguments. Both always parse and validate. ``"none"``: no call is parsed.
- Responses carry ``tool_calls`` (``call_<hex>`` ids, names, JSON arguments) and finish_reason
  ``"tool_calls"``. Streams send content as it comes and each call as OpenAI streams one while the
  model writes it: id, type and name with empty arguments once the name is known, then the arguments'
  JSON text in fragments (tool_stream.py), then the finish reason. ``parallel_tool_calls`` false keeps
  the first call (any parser).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from scheduler_svc.gateway.openai_protocol import ApiError, finish_reason
from scheduler_svc.gateway.tool_parsers import (
    PARSERS,
    SCANNERS,
    Scanner,
    ToolCall,
    named_scanner,
    new_call_id,
    parse_whole,
    parser_for_template,
    scan_none,
    scan_required,
)
from scheduler_svc.gateway.tool_stream import ToolCallStream

TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "tool_call_parser")


@dataclass(frozen=True, slots=True)
class ToolRequest:
    tools: list[dict]  # as the template gets them: {"type": "function", "function": {...}}
    choice: str  # "auto", "required", "none" or "named"
    named: str | None
    parallel: bool
    parser: str

    def constraint_schema(self) -> dict | None:
        """The JSON schema the output is generated under (required, named), else None."""
        if self.choice == "named":
            return self._parameters(self.named)
        if self.choice != "required":
            return None
        items = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                    "arguments": self._parameters(t["function"]["name"])},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
        schema = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def _parameters(self, name: str) -> dict:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or {"type": "object"}

    def scanner(self) -> Scanner:
        """How this request's output is read (tool_parsers.py): by its choice, else the family's parser."""
        if self.choice == "none":
            return scan_none
        if self.choice == "named":
            return named_scanner(self.named)
        if self.choice == "required":
            return scan_required
        return SCANNERS[self.parser]

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished output; the text as content when it holds no whole call (a
        required or named output cut by max_tokens, say)."""
        return parse_whole(self.scanner(), text, self.max_calls)


def parse_tool_request(body: dict, template_source: str | None, parser: str | None = None) -> ToolRequest | None:
    """The body's tool fields; None without tools. ``parser``: the server's --tool-call-parser, which the
    body's ``tool_call_parser`` (an extension) overrides. Raises ApiError naming the field."""
    parser = body.get("tool_call_parser") or parser
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise ApiError.invalid("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list):
        raise ApiError.invalid("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ApiError.invalid(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": {...}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError.invalid(f"tools[{i}].function.name", "must be a non-empty string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ApiError.invalid(f"tools[{i}].function.parameters", "must be a JSON schema object")
        names.append(fn["name"])
    named = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if named not in names:
            raise ApiError.invalid("tool_choice", f"must name one of the tools ({', '.join(names)})")
        choice = "named"
    elif choice not in ("auto", "required", "none"):
        raise ApiError.invalid("tool_choice", "must be none, auto, required or {\"type\": \"function\", ...}")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ApiError.invalid("parallel_tool_calls", "must be true or false")
    if body.get("logprobs"):
        raise ApiError.invalid("logprobs", "is not supported together with tools")
    if parser is not None and parser not in PARSERS:
        raise ApiError.invalid("tool_call_parser", f"unknown parser {parser!r} (one of {', '.join(PARSERS)})")
    tools = [{"type": "function", "function": t["function"]} for t in tools]
    return ToolRequest(tools, choice, named, parallel, parser or parser_for_template(template_source))


def template_messages(messages: list) -> list:
    """Messages as chat templates read them: tool calls' arguments as objects (OpenAI sends JSON text);
    an assistant message with tool calls may have no content. Raises ApiError naming the field."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not (m.get("tool_calls") or m.get("role") == "tool"):
            out.append(m)
            continue
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("role") == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise ApiError.invalid(f"messages[{i}].tool_call_id", "must be a string")
        calls = []
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ApiError.invalid(f"messages[{i}].tool_calls[{j}]", "must be a function call with a name")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args or "{}")
                except json.JSONDecodeError:
                    raise ApiError.invalid(f"messages[{i}].tool_calls[{j}].function.arguments",
                                           "must be JSON text") from None
            calls.append({"id": call.get("id"), "type": "function",
                          "function": {"name": fn["name"], "arguments": args}})
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


def _tool_calls(calls: list[ToolCall]) -> list[dict]:
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


class ToolCallsShape:
    """Mixin over the chat shape: parses each choice's text at its end into tool calls."""

    tool_request: ToolRequest

    def whole(self, index: int, c) -> dict:
        body = super().whole(index, c)
        content, calls = self.tool_request.parse("".join(c.text))
        if calls:
            body["message"] = {"role": "assistant", "content": content, "tool_calls": _tool_calls(calls)}
            if c.finish_reason == "stop":
                body["finish_reason"] = "tool_calls"
        return body

    def chunks(self, index: int, resp, c) -> list[dict]:
        """Content as it comes and each call as OpenAI streams one (tool_stream.py), then the finish reason."""
        streams = vars(self).setdefault("_tool_streams", {})  # by choice index; the shape is per request
        stream = streams.get(index)
        out = []
        if stream is None:  # a choice opens with the assistant's role, as OpenAI's streams do
            stream = streams[index] = ToolCallStream(self.tool_request.scanner(), self.tool_request.max_calls)
            out.append({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None})
        c.started = True
        c.text.append(resp.text)
        reason = finish_reason(resp.finish_reason)
        deltas = stream.feed(resp.text) + (stream.finish() if reason else [])
        out += [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if reason:
            out.append({"index": index, "delta": {}, "logprobs": None,
                        "finish_reason": "tool_calls" if stream.has_calls and reason == "stop" else reason})
        return out


def validated_messages(messages, validate) -> list:
    """``validate`` (the gateway's message check: roles, string contents) over the messages, tool-call
    history included: tool messages are checked with an empty content standing in for a missing one,
    then keep their tool fields (template_messages)."""
    if not isinstance(messages, list) or not any(
            isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages):
        return validate(messages)
    tooled = template_messages(messages)
    plain = validate([{k: v for k, v in m.items() if k in ("role", "content", "name")} for m in tooled])
    for m, p in zip(tooled, plain, strict=True):
        for key in ("tool_calls", "tool_call_id"):
            if m.get(key) is not None:
                p[key] = m[key]
    return plain
