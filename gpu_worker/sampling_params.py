"""Sampling parameters: the one form they take inside every process, validated once, at construction.

Protos appear only at process edges: the gateway and ``LLM`` send ``to_proto()`` in a Submit, the
scheduler decodes each Submit with ``from_proto`` (and encodes a sequence's parameters into the
StepPlan), and the worker decodes the plan's with ``from_proto`` again. Defaults are resolved in
``from_proto``, so no reader of a SamplingParams resolves them again. This module needs only the
standard library and the generated message stubs (no grpc), so the worker imports it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import clients  # noqa: F401  (puts the generated stubs on sys.path)
from gpu_worker.constraint import Constraint
from pagedserve.internal.v1 import scheduler_pb2

MAX_N = 16
MAX_TOP_LOGPROBS = 20


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
    early_stopping: bool | str = False  # beam search, as transformers: False, True or "never"
    logprobs: bool = False
    top_logprobs: int = 0
    repetition_penalty: float = 1.0
    constraint: Constraint | None = None  # structured output (gpu_worker/constraint.py)

    def __post_init__(self) -> None:
        # Sequences given as lists become tuples: the parameters stay immutable and hashable.
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.top_logprobs and not self.logprobs:  # alternatives come with the sampled token's own
            object.__setattr__(self, "logprobs", True)
        # Messages are formatted only on failure: the worker and the scheduler construct these per
        # sequence.
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
               "must be an integer >= 1, got {!r}", self.max_tokens)
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
        _check(self.early_stopping in (False, True, "never"), "early_stopping",
               "must be False, True or 'never', got {!r}", self.early_stopping)
        _check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
               f"must be in [0, {MAX_TOP_LOGPROBS}], got {{}}", self.top_logprobs)
        _check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0, got {}", self.repetition_penalty)
        if self.beam_width > 1:
            self._check_beam_search()
        # A constrained sequence ends when its grammar allows only end-of-sequence: it needs EOS.
        _check(self.constraint is None or not self.ignore_eos, "ignore_eos",
               "must be false with an output constraint (the constraint ends with end-of-sequence)")

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

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
            early_stopping=_EARLY_STOPPING_FROM_PROTO.get(p.early_stopping, p.early_stopping),  # unknown: rejected
            logprobs=p.logprobs,
            top_logprobs=p.top_logprobs,
            repetition_penalty=p.repetition_penalty or 1.0,
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
            early_stopping=_EARLY_STOPPING[self.early_stopping],
            constraint=self.constraint.to_proto() if self.constraint is not None else None,
        )


_EARLY_STOPPING = {
    False: scheduler_pb2.EARLY_STOPPING_HEURISTIC,
    True: scheduler_pb2.EARLY_STOPPING_ON_FULL,
    "never": scheduler_pb2.EARLY_STOPPING_NEVER,
}
_EARLY_STOPPING_FROM_PROTO = {v: k for k, v in _EARLY_STOPPING.items()} | {
    scheduler_pb2.EARLY_STOPPING_UNSPECIFIED: False,
}


def _check(ok: bool, field_name: str, message: str, *values: object) -> None:
    if not ok:
        raise InvalidField(field_name, message.format(*values))


class InvalidField(ValueError):
    """A request field is invalid; ``field`` names it (carried to clients as INVALID_ARGUMENT)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
