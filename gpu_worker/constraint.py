"""A request's output constraint (structured output): one of a JSON schema, any JSON object, a regular
expression, a choice among strings, or an EBNF grammar. The form it takes in every process, as
SamplingParams does; the worker compiles it with xgrammar (gpu_worker/grammar.py).

``check`` parses the source with xgrammar (no tokenizer needed, milliseconds), so a bad schema or
grammar is refused where the request enters, naming the field, and the engine never sees one. This
module imports xgrammar only inside ``check`` and ``to_grammar``: the scheduler never needs it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import clients  # noqa: F401  (puts the generated stubs on sys.path)
from pagedserve.internal.v1 import scheduler_pb2

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SOURCE_CHARS = 200_000
MAX_CHOICES = 1024
_MAX_SPACE = 8  # whitespace characters in a row inside JSON output

_TO_PROTO = {
    "json_schema": scheduler_pb2.CONSTRAINT_KIND_JSON_SCHEMA,
    "json_object": scheduler_pb2.CONSTRAINT_KIND_JSON_OBJECT,
    "regex": scheduler_pb2.CONSTRAINT_KIND_REGEX,
    "choice": scheduler_pb2.CONSTRAINT_KIND_CHOICE,
    "grammar": scheduler_pb2.CONSTRAINT_KIND_GRAMMAR,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


class ConstraintError(ValueError):
    """The constraint's source does not parse; the caller names the field."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """``source``: the schema's JSON text, the regex, the EBNF grammar, or (choice) a JSON list of the
    strings; empty for json_object. Hashable: compiled grammars are cached by it."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r} (one of {', '.join(KINDS)})")
        if len(self.source) > MAX_SOURCE_CHARS:
            raise ConstraintError(f"at most {MAX_SOURCE_CHARS} characters, got {len(self.source)}")

    @classmethod
    def json_schema(cls, schema: dict | str) -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ConstraintError(f"is not JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"must be a JSON object (a JSON schema), got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))  # key order kept: it is the output order

    @classmethod
    def choice(cls, choices: list[str] | tuple[str, ...]) -> Constraint:
        if not choices or len(choices) > MAX_CHOICES or not all(isinstance(c, str) and c for c in choices):
            raise ConstraintError(f"must be 1 to {MAX_CHOICES} non-empty strings")
        return cls("choice", json.dumps(list(choices)))

    def to_proto(self) -> scheduler_pb2.Constraint:
        return scheduler_pb2.Constraint(kind=_TO_PROTO[self.kind], source=self.source)

    @classmethod
    def from_proto(cls, p: scheduler_pb2.Constraint) -> Constraint | None:
        kind = _FROM_PROTO.get(p.kind)
        return None if kind is None else cls(kind, p.source)

    def to_grammar(self):
        """The xgrammar Grammar of this constraint; raises ConstraintError when the source is bad."""
        import xgrammar as xgr

        try:
            # JSON: whitespace between tokens is allowed, but at most a few characters in a row, so a
            # small model cannot spend its max_tokens on blank space (an unbounded vLLM failure mode).
            if self.kind == "json_schema":
                return xgr.Grammar.from_json_schema(self.source, strict_mode=True, max_whitespace_cnt=_MAX_SPACE)
            if self.kind == "json_object":
                return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False,
                                                    max_whitespace_cnt=_MAX_SPACE)
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.source)
            if self.kind == "choice":
                alternatives = " | ".join(_ebnf_string(c) for c in json.loads(self.source))
                return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
            return xgr.Grammar.from_ebnf(self.source)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError/InvalidJSONError by case
            raise ConstraintError(_first_line(exc)) from None

    def check(self) -> None:
        """Parses the source (raises ConstraintError); cheap, needs no tokenizer."""
        self.to_grammar()


def _ebnf_string(s: str) -> str:
    """A double-quoted EBNF literal of ``s`` (JSON escapes are xgrammar's string escapes)."""
    return json.dumps(s, ensure_ascii=False)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    # xgrammar prefixes its messages with "[hh:mm:ss] /source/file.cc:line: "
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text.splitlines()[0])[:300]
