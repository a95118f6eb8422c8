"""Structured output at the gateway: the public proto's ``constraint`` oneof and the HTTP bodies'
spellings of it (OpenAI ``response_format``; vLLM's ``structured_outputs`` and its older ``guided_*``
names) become one Constraint, checked here (xgrammar parses it) so a bad schema, regex or grammar is
refused with the field's name and never reaches the engine."""

from __future__ import annotations

import json

import clients  # noqa: F401
from gpu_worker.constraint import Constraint, ConstraintError
from gpu_worker.sampling_params import InvalidField
from pagedserve.v1 import generation_pb2


def constraint_of(p: generation_pb2.SamplingParams, prefix: str = "sampling_params.") -> Constraint | None:
    """The public proto's constraint, parsed; raises InvalidField naming the oneof's field."""
    which = p.WhichOneof("constraint")
    if which is None:
        return None
    field = prefix + which
    try:
        if which == "json_schema":
            constraint = Constraint.json_schema(p.json_schema)
        elif which == "json_object":
            if not p.json_object:
                return None
            constraint = Constraint("json_object")
        elif which == "choice":
            constraint = Constraint.choice(list(p.choice.choices))
        else:  # regex, grammar
            if not getattr(p, which):
                raise ConstraintError("must not be empty")
            constraint = Constraint(which, getattr(p, which))
        constraint.check()
    except ConstraintError as exc:
        raise InvalidField(field, str(exc)) from None
    return constraint


def set_from_body(body: dict, p: generation_pb2.SamplingParams) -> str | None:
    """Sets ``p``'s constraint from an HTTP body; returns the body field it came from (for errors) or
    None. At most one of response_format (other than text), structured_outputs and guided_* may be set.
    Raises InvalidField naming the body field."""
    found: list[tuple[str, str, object]] = []  # (body field, kind, value)
    fmt = body.get("response_format")
    if fmt is not None:
        found.extend(_response_format(fmt))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidField("structured_outputs", "must be an object")
        for key, kind in _VLLM_KEYS.items():
            if so.get(key) is not None and so.get(key) is not False:
                found.append((f"structured_outputs.{key}", kind, so[key]))
        # vLLM's whitespace controls: the neutral values only (JSON grammars here allow up to 8 whitespace
        # characters in a row; neither "none" nor a custom pattern is implemented).
        neutral = {k for k, v in so.items()
                   if (k, v) in (("disable_any_whitespace", False), ("whitespace_pattern", None))}
        unknown = sorted(set(so) - set(_VLLM_KEYS) - neutral)
        if unknown:
            raise InvalidField(f"structured_outputs.{unknown[0]}", "is not supported (json, json_object, regex, "
                               "choice, grammar)")
    for key, kind in _VLLM_KEYS.items():
        if body.get(f"guided_{key}") is not None:
            found.append((f"guided_{key}", kind, body[f"guided_{key}"]))
    if not found:
        return None
    if len(found) > 1:
        raise InvalidField(found[1][0], f"only one output constraint per request ({found[0][0]} is set)")
    field, kind, value = found[0]
    _set(p, field, kind, value)
    return field


_VLLM_KEYS = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
              "grammar": "grammar"}


def _response_format(fmt) -> list[tuple[str, str, object]]:
    if not isinstance(fmt, dict):
        raise InvalidField("response_format", "must be an object with a type")
    kind = fmt.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", "json_object", True)]
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidField("response_format.json_schema", "must be an object with a schema object")
        # strict or not, the output is generated under the schema (strict only tightens it).
        return [("response_format.json_schema.schema", "json_schema", spec.get("schema", {}))]
    raise InvalidField("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")


def _set(p: generation_pb2.SamplingParams, field: str, kind: str, value) -> None:
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidField(field, f"is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidField(field, "must be a JSON schema object")
        p.json_schema = json.dumps(value)
    elif kind == "json_object":
        p.json_object = True
    elif kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
            raise InvalidField(field, "must be a non-empty list of strings")
        p.choice.choices.extend(value)
    else:
        if not isinstance(value, str) or not value:
            raise InvalidField(field, "must be a non-empty string")
        setattr(p, kind, value)
    try:
        constraint_of(p, prefix="")  # parse now, so that the error names the body's field
    except InvalidField as exc:
        raise InvalidField(field, str(exc)[len(exc.field) + 2:]) from None
