"""Beam search as transformers' ``generate(num_beams=k, do_sample=False)`` runs it, one step at a time.

Each step takes the running beams (best first) and every beam's top candidates (token, log
probability), as the workers return them, and decides:
- the candidates: the ``num_candidates`` best (beam, token) continuations by accumulated log
  probability, where ``num_candidates = max(2, 1 + number of stop tokens) * beam_width`` so that at
  least ``beam_width`` of them do not stop;
- the next running beams: the best ``beam_width`` candidates that do not stop;
- the finished hypotheses: among the first ``beam_width`` candidates, those that stop (a stop token or
  the length limit), scored by ``sum of log probabilities / output_length ** length_penalty``; the best
  ``beam_width`` hypotheses seen so far are kept;
- whether to stop: when no running beam can improve on the finished ones (the early-stopping rule),
  when ``beam_width`` hypotheses are finished and early stopping is ON_FULL, or when every candidate
  stopped.

The early-stopping rule (``early_stopping`` False, transformers' heuristic): once ``beam_width``
hypotheses are finished, the best running beam is scored at its current output length (or at the
longest possible one, for "never" with a positive length penalty); if that does not beat the worst
finished hypothesis, the search is over. The rule is sticky: once no improvement is possible, no
hypothesis is added any more. With ``early_stopping`` True the search ends as soon as ``beam_width``
hypotheses are finished.

Scores divide by ``length ** length_penalty`` as transformers does, in IEEE arithmetic for any finite
penalty (``length_normalized``): where the power overflows (a penalty of 1000 at length 2) the score
tends to 0, where it underflows (-2000) to minus infinity; transformers itself raises OverflowError
there, and gives the same scores wherever it does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpu_worker.sampling_params import EarlyStopping


@dataclass(slots=True)
class Hypothesis:
    """A finished beam: its output tokens (ending with the stop token, if any) and its score."""

    score: float  # sum of log probabilities / len(token_ids) ** length_penalty
    token_ids: list[int]


@dataclass(slots=True)
class Candidate:
    """A continuation: the running beam it extends (its index), the next token and its new score."""

    beam: int
    token_id: int
    score: float  # accumulated log probability of the beam's output tokens


class BeamSearch:
    def __init__(
        self,
        beam_width: int,
        num_prompt_tokens: int,
        max_num_tokens: int,
        stop_token_ids: frozenset[int],
        length_penalty: float = 1.0,
        early_stopping: EarlyStopping | bool | str = EarlyStopping.HEURISTIC,  # or transformers' False, True, "never"
    ) -> None:
        if beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {beam_width}")
        if max_num_tokens <= num_prompt_tokens:
            raise ValueError("max_num_tokens leaves no room for output")
        self.beam_width = beam_width
        self.num_prompt_tokens = num_prompt_tokens
        self.max_num_tokens = max_num_tokens  # prompt plus output, the length limit
        self.stop_token_ids = stop_token_ids
        self.length_penalty = length_penalty
        self.early_stopping = EarlyStopping.of(early_stopping)
        self.num_candidates = max(2, 1 + len(stop_token_ids)) * beam_width
        self.finished: list[Hypothesis] = []  # best first, at most beam_width
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.done = False

    def step(
        self,
        scores: list[float],
        outputs: list[list[int]],
        top_token_ids: list[list[int]],
        top_logprobs: list[list[float]],
    ) -> list[Candidate]:
        """One step over the running beams, given best first: their scores, output tokens so far (all
        of one length) and their top candidates. Returns the next running beams, best first; empty
        once ``done``."""
        if self.done:
            raise RuntimeError("beam search is over")
        candidates = self._top_candidates(scores, top_token_ids, top_logprobs)
        num_out = len(outputs[0]) + 1  # output length once the candidate token is appended
        at_limit = self.num_prompt_tokens + num_out >= self.max_num_tokens
        stops = [at_limit or c.token_id in self.stop_token_ids for c in candidates]
        running = [c for c, stop in zip(candidates, stops, strict=True) if not stop][: self.beam_width]
        self._add_finished(candidates, stops, outputs, num_out)
        if self.improvable and len(self.finished) == self.beam_width and running:
            self.improvable = self._can_improve(running[0].score, num_out)
        full = len(self.finished) == self.beam_width
        self.done = (
            not self.improvable
            or (full and self.early_stopping is EarlyStopping.ON_FULL)
            or all(stops)
        )
        return [] if self.done else running

    def _top_candidates(self, scores, top_token_ids, top_logprobs) -> list[Candidate]:
        candidates = [
            Candidate(beam, token, score + lp)
            for beam, (score, tokens, lps) in enumerate(zip(scores, top_token_ids, top_logprobs, strict=True))
            for token, lp in zip(tokens, lps, strict=True)
        ]
        # Stable: equal scores keep beam order, then the workers' rank order.
        candidates.sort(key=lambda c: -c.score)
        return candidates[: self.num_candidates]

    def _add_finished(self, candidates, stops, outputs, num_out: int) -> None:
        """Only the first beam_width candidates may finish; the rest are there to keep beams running."""
        if not self.improvable:
            return
        if len(self.finished) == self.beam_width and self.early_stopping is EarlyStopping.ON_FULL:
            return
        new = [
            Hypothesis(length_normalized(c.score, num_out, self.length_penalty), outputs[c.beam] + [c.token_id])
            for c, stop in zip(candidates[: self.beam_width], stops, strict=False)
            if stop
        ]
        if new:
            merged = self.finished + new
            merged.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
            self.finished = merged[: self.beam_width]

    def _can_improve(self, best_running_score: float, num_out: int) -> bool:
        length = num_out
        if self.early_stopping is EarlyStopping.NEVER and self.length_penalty > 0:
            length = self.max_num_tokens - self.num_prompt_tokens
        best_possible = length_normalized(best_running_score, length, self.length_penalty)
        return best_possible > min(h.score for h in self.finished)


def length_normalized(score: float, length: int, length_penalty: float) -> float:
    """``score / length ** length_penalty`` (transformers' hypothesis score) for any finite penalty,
    never raising: Python's float power raises OverflowError where the power exceeds the float range
    and its division raises ZeroDivisionError where the power underflows to 0; here both take the
    IEEE limits (a sum of log probabilities is <= 0, so -0.0 and -inf; nan never comes out)."""
    try:
        norm = length**length_penalty
    except OverflowError:
        norm = math.inf
    if norm == 0.0:
        return math.copysign(math.inf, score) if score else score
    if math.isinf(norm):
        return score if math.isinf(score) else math.copysign(0.0, score)  # -inf stays the worst
    return score / norm
