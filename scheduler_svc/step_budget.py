"""The scheduler's working records while it plans one step: what each pick takes and what is left.

A ``Pick`` is decided before any block is taken (phase one of ``Scheduler.schedule``), so that
preemption can still give a pick's reservation back; ``StepBudget`` is the running account of the
step's token budget, sequence seats and reserved blocks.

``--max-prefill-tokens-with-decodes`` caps the prompt tokens of a step that also decodes: the decodes are
picked first, one token each, so the step's budget becomes the decodes plus the cap (``cap_prefill``),
and what prefill chunks, swap-ins and admissions take comes out of that cap. A step with no decode keeps
the whole ``--max-num-batched-tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler_svc.request import Request, Sequence


@dataclass(slots=True)
class Pick:
    """A running group's share of the step, decided before any block is taken."""

    request: Request
    slots: list[tuple[Sequence, int]]  # (sequence, tokens to compute)
    num_forks: int  # parallel sampling: samples to fork from slots[0] first
    num_blocks: int  # blocks the slots will take (new ones and copies)


@dataclass(slots=True)
class StepBudget:
    """The step being planned: what is left of the token budget, seats and blocks taken by picks."""

    budget: int
    num_seqs: int = 0
    num_reserved_blocks: int = 0
    picks: list[Pick] = field(default_factory=list)

    def cap_prefill(self, max_prefill_tokens: int, num_decodes: int) -> None:
        """With decodes in the step and a cap (> 0): the budget is at most the decodes plus the cap."""
        self.budget = capped_tokens(self.budget, max_prefill_tokens, num_decodes)

    def unpick(self, request: Request) -> None:
        """Gives back what the request's picks took (its group is being preempted)."""
        for pick in [p for p in self.picks if p.request is request]:
            self.picks.remove(pick)
            self.num_reserved_blocks -= pick.num_blocks
            self.num_seqs -= len(pick.slots) + pick.num_forks
            self.budget += sum(n for _, n in pick.slots) + pick.num_forks


def capped_tokens(budget: int, max_prefill_tokens: int, num_decodes: int) -> int:
    """A step's token ``budget`` once ``num_decodes`` decodes are in it: at most the decodes plus the
    prefill cap, where there is a cap (> 0) and a decode."""
    if max_prefill_tokens and num_decodes:
        return min(budget, num_decodes + max_prefill_tokens)
    return budget
