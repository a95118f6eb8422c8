"""The sampling parameters of a request, as the Python client sends them (``pagedserve.client`` re-exports
``SamplingParams``; see generation.proto for each field's meaning)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pagedserve.v1 import generation_pb2

_EARLY_STOPPING = {
    False: generation_pb2.EARLY_STOPPING_HEURISTIC,
    True: generation_pb2.EARLY_STOPPING_ON_FULL,
    "never": generation_pb2.EARLY_STOPPING_NEVER,
}


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How tokens are chosen; ``None`` leaves a field to the server's default (see generation.proto)."""

    max_tokens: int | None = 16  # None: until the context ends
    temperature: float | None = None  # server default 1.0; 0 is greedy
    top_k: int = 0
    top_p: float | None = None  # server default 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    n: int | None = None  # server default 1
    beam_width: int = 0
    length_penalty: float | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    repetition_penalty: float | None = None
    early_stopping: bool | str | None = None  # beam search, as transformers: False, True or "never"; server: False
    min_tokens: int = 0  # no stop (EOS, stop token or string) before this many tokens
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0  # OpenAI's, over the generated tokens
    logit_bias: Mapping[int, float] | None = None  # token id -> bias in [-100, 100]
    prompt_logprobs: int | None = None  # alternatives per prompt token; None: no prompt logprobs
    include_stop_str_in_output: bool = False  # keep the stop string that ended a sample in its text
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last N tokens
    # Output constraint (structured output): at most one of these.
    json_schema: dict | str | None = None  # a JSON schema (dict or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None  # EBNF (GBNF), start rule `root`

    def to_proto(self) -> generation_pb2.SamplingParams:
        p = generation_pb2.SamplingParams(
            top_k=self.top_k, min_p=self.min_p, stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos, beam_width=self.beam_width,
            logprobs=self.logprobs, top_logprobs=self.top_logprobs, min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=[generation_pb2.LogitBias(token_id=t, bias=b) for t, b in (self.logit_bias or {}).items()],
            include_stop_str_in_output=self.include_stop_str_in_output,
        )
        if self.prompt_logprobs is not None:
            p.prompt_logprobs = self.prompt_logprobs
        if self.early_stopping is not None:
            if self.early_stopping not in _EARLY_STOPPING:
                raise ValueError(f"early_stopping must be False, True or 'never', got {self.early_stopping!r}")
            p.early_stopping = _EARLY_STOPPING[self.early_stopping]
        for name in ("max_tokens", "temperature", "top_p", "seed", "n", "length_penalty", "repetition_penalty",
                     "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(p, name, value)
        self._set_constraint(p)
        return p

    def _set_constraint(self, p: generation_pb2.SamplingParams) -> None:
        given = [name for name in ("json_schema", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) > 1:
            raise ValueError(f"at most one output constraint, got {', '.join(given)}")
        if self.json_schema is not None:
            p.json_schema = self.json_schema if isinstance(self.json_schema, str) else json.dumps(self.json_schema)
        elif self.json_object:
            p.json_object = True
        elif self.choice is not None:
            p.choice.choices.extend(self.choice)
        elif self.regex is not None:
            p.regex = self.regex
        elif self.grammar is not None:
            p.grammar = self.grammar
