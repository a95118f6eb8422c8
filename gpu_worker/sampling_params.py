"""Sampling parameters: the one form they take inside every process, validated once, at construction.

Protos appear only at process edges: the gateway and ``LLM`` send ``to_proto()`` in a Submit, the
scheduler decodes each Submit with ``from_proto`` (and encodes a sequence's parameters into the
StepPlan), and the worker decodes the plan's with ``from_proto`` again. Defaults are resolved in
``from_proto``, so no reader of a SamplingParams resolves them again. This module needs only the
standard library and the generated message stubs (no grpc), so the worker imports it too.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

import clients  # noqa: F401  (puts the generated stubs on sys.path)
from gpu_worker.constraint import Constraint
from pagedserve.internal.v1 import scheduler_pb2

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound: -100 bans a token, 100 makes it the only choice
MAX_PENALTY = 2.0  # OpenAI's bound on presence_penalty and frequency_penalty


class EarlyStopping(enum.Enum):
    """Beam search's stopping rule, transformers' ``early_stopping``; the values are the protos'
    EARLY_STOPPING_* numbers (public and internal alike), so the edges convert with ``.value``."""

    HEURISTIC = scheduler_pb2.EARLY_STOPPING_HEURISTIC  # transformers' False
    ON_FULL = scheduler_pb2.EARLY_STOPPING_ON_FULL  # transformers' True
    NEVER = scheduler_pb2.EARLY_STOPPING_NEVER  # transformers' "never"

    @classmethod
    def of(cls, value: EarlyStopping | bool | str | int) -> EarlyStopping:
        """From transformers' False, True or "never", a CLI's "false"/"true"/"never", or a proto number
        (0, unset, is the heuristic); raises InvalidField("early_stopping") otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls.ON_FULL if value else cls.HEURISTIC
        if isinstance(value, str) and value.upper() in _EARLY_STOPPING_NAMES:
            return _EARLY_STOPPING_NAMES[value.upper()]
        if isinstance(value, int) and (value == 0 or value in cls._value2member_map_):
            return cls(value or cls.HEURISTIC)
        raise InvalidField("early_stopping", f"must be False, True or 'never', got {value!r}")

    @property
    def transformers(self) -> bool | str:
        """The value transformers' ``generate(early_stopping=...)`` takes."""
        return {EarlyStopping.HEURISTIC: False, EarlyStopping.ON_FULL: True}.get(self, "never")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How tokens are chosen and when a sequence stops. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = EarlyStopping.HEURISTIC  # also given as transformers' False, True, "never"
    logprobs: bool = False
    top_logprobs: int = 0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS, stop tokens and stop strings end nothing before this many outputs
    presence_penalty: float = 0.0  # OpenAI's, over the output tokens
    frequency_penalty: float = 0.0  # OpenAI's, over the output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by token id
    prompt_logprobs: int | None = None  # alternatives per prompt position; None: no prompt logprobs
    constraint: Constraint | None = None  # structured output (gpu_worker/constraint.py)

    def __post_init__(self) -> None:
        # Sequences given as lists become tuples: the parameters stay immutable and hashable.
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.logit_bias:  # a dict or (token id, bias) pairs, kept sorted by token id
            bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
            object.__setattr__(self, "logit_bias", tuple(sorted(tuple(x) for x in bias)))
        elif not isinstance(self.logit_bias, tuple):
            object.__setattr__(self, "logit_bias", ())
        if not isinstance(self.early_stopping, EarlyStopping):
            object.__setattr__(self, "early_stopping", EarlyStopping.of(self.early_stopping))
        if self.top_logprobs and not self.logprobs:  # alternatives come with the sampled token's own
            object.__setattr__(self, "logprobs", True)
        # Messages are formatted only on failure: the worker and the scheduler construct these per
        # sequence.
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
               "must be an integer >= 1, got {!r}", self.max_tokens)
        for name in _FLOAT_FIELDS:  # nan and inf pass or fail the range checks below by accident
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value), name,
                   "must be a finite number, got {}", value)
        _check(self.temperature >= 0, "temperature", "must be >= 0, got {}", self.temperature)
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
               "must be an integer >= 0 (0 disables), got {!r}", self.top_k)
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1], got {}", self.top_p)
        _check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1], got {}", self.min_p)
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed",
               "must be an integer in [0, 2**63), got {!r}", self.seed)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative integers")
        _check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n",
               f"must be an integer in [1, {MAX_N}], got {{!r}}", self.n)
        _check(isinstance(self.beam_width, int) and 1 <= self.beam_width <= MAX_N, "beam_width",
               f"must be an integer in [1, {MAX_N}], got {{!r}}", self.beam_width)
        _check(self.n == 1 or self.beam_width == 1, "n",
               "must be 1 with beam search (beam_width > 1 returns beam_width beams)")
        _check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
               f"must be in [0, {MAX_TOP_LOGPROBS}], got {{}}", self.top_logprobs)
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0, got {}", self.repetition_penalty)
        self._check_openai_params()
        if self.beam_width > 1:
            self._check_beam_search()
        # A constrained sequence ends when its grammar allows only end-of-sequence: it needs EOS.
        _check(self.constraint is None or not self.ignore_eos, "ignore_eos",
               "must be false with an output constraint (the constraint ends with end-of-sequence)")

    def _check_openai_params(self) -> None:
        """min_tokens, the OpenAI penalties, logit_bias and prompt_logprobs (vLLM's ranges)."""
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               "must be an integer in [0, max_tokens], got {!r}", self.min_tokens)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-MAX_PENALTY <= value <= MAX_PENALTY, name, f"must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {{}}",
                   value)
        bias = self.logit_bias
        _check(len(bias) <= MAX_LOGIT_BIAS_ENTRIES, "logit_bias",
               f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {{}}", len(bias))
        _check(all(isinstance(t, int) and t >= 0 for t, _ in bias), "logit_bias", "keys must be token ids (>= 0)")
        _check(all(-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for _, b in bias), "logit_bias",
               f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        _check(len({t for t, _ in bias}) == len(bias), "logit_bias", "names a token id twice")
        k = self.prompt_logprobs
        _check(k is None or (isinstance(k, int) and 0 <= k <= MAX_TOP_LOGPROBS), "prompt_logprobs",
               f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got {{!r}}", k)

    @property
    def penalized(self) -> bool:
        """Whether the logits change before sampling (repetition, presence, frequency penalty, bias,
        min_tokens): such rows are sampled on the host path, never by a plain argmax."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or self.min_tokens > 0)

    def _check_beam_search(self) -> None:
        """Beam search scores the model's own log probabilities and returns whole beams: refuse what it
        would otherwise ignore silently. Temperature 1 (the default) leaves the distribution as it is."""
        why = "beam search scores the model's log probabilities unchanged"
        _check(self.temperature in (0.0, 1.0), "temperature", f"must be unset, 0 or 1 with beam search ({why}), "
               "got {}", self.temperature)
        for name, neutral in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0), ("repetition_penalty", 1.0)):
            _check(getattr(self, name) == neutral, name, f"must be unset or {neutral} with beam search ({why}), "
                   "got {}", getattr(self, name))
        _check(not self.logprobs, "top_logprobs" if self.top_logprobs else "logprobs",
               "not returned with beam search (beams are chosen from the top candidates of every step)")
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("logit_bias", ()),
                              ("min_tokens", 0)):
            _check(getattr(self, name) == neutral, name, f"is not supported with beam search ({why})")
        _check(self.prompt_logprobs is None, "prompt_logprobs", "is not supported with beam search")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain_greedy(self) -> bool:
        """Whether a plain argmax of the raw logits gives the next token and nothing more is returned:
        greedy, nothing changes the logits first (``penalized``), no logprobs. Only such rows take the
        worker's device fast path (and may be pipelined); a new parameter that changes how a token is
        chosen belongs in ``penalized`` or here, and nowhere else. (Prompt logprobs concern prefill
        positions, not the sampled token: the worker checks them per step.)"""
        return self.temperature == 0 and not self.penalized and not self.logprobs

    def for_beams(self) -> SamplingParams:
        """What a beam sends to the workers: greedy scoring, no logprob of its own; the top alternatives
        travel as the plan's num_top_logprobs (Request.num_top_logprobs), and the scheduler chooses the
        beams."""
        return replace(self, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=None,
                       logprobs=False, top_logprobs=0)

    @classmethod
    def from_proto(cls, p: scheduler_pb2.SamplingParams) -> SamplingParams:
        """The parameters a Submit or a StepPlan carries; raises InvalidField. Fields whose zero value
        is not a valid setting (top_p, repetition_penalty, n, beam_width, early_stopping) read zero
        as unset and take their defaults; stop strings never leave the gateway."""
        return cls(
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p or 1.0,
            min_p=p.min_p,
            seed=p.seed if p.has_seed else None,
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            n=p.n or 1,
            beam_width=p.beam_width or 1,
            length_penalty=p.length_penalty,
            early_stopping=EarlyStopping.of(p.early_stopping),  # unknown: rejected
            logprobs=p.logprobs,
            top_logprobs=p.top_logprobs,
            repetition_penalty=p.repetition_penalty or 1.0,
            min_tokens=p.min_tokens,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logit_bias=tuple(zip(p.logit_bias_token_ids, p.logit_bias_values, strict=True)),
            prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
            constraint=Constraint.from_proto(p.constraint) if p.HasField("constraint") else None,
        )

    def to_proto(self) -> scheduler_pb2.SamplingParams:
        return scheduler_pb2.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            has_seed=self.seed is not None,
            seed=self.seed or 0,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            n=self.n,
            beam_width=self.beam_width,
            length_penalty=self.length_penalty,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            repetition_penalty=self.repetition_penalty,
            early_stopping=self.early_stopping.value,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias_token_ids=[t for t, _ in self.logit_bias],
            logit_bias_values=[b for _, b in self.logit_bias],
            prompt_logprobs=self.prompt_logprobs,
            constraint=self.constraint.to_proto() if self.constraint is not None else None,
        )


_EARLY_STOPPING_NAMES = {
    "FALSE": EarlyStopping.HEURISTIC, "TRUE": EarlyStopping.ON_FULL, "NEVER": EarlyStopping.NEVER,
    **{member.name: member for member in EarlyStopping},
}


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "length_penalty", "repetition_penalty")


def _check(ok: bool, field_name: str, message: str, *values: object) -> None:
    if not ok:
        raise InvalidField(field_name, message.format(*values))


class InvalidField(ValueError):
    """A request field is invalid; ``field`` names it (carried to clients as INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason  # the message without its "field: " prefix, for a caller that renames the field
