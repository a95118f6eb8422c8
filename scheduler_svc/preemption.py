"""Preemption and swapping: taking groups off the device when blocks run out, and bringing swapped groups
back. A ``Preemptor`` does the work over the scheduler's queues (``SeqQueues``, shared with it); which
group goes is its ``victim`` function, the one policy here: changing it is this file and its test
(tests/scheduler_svc/test_preemption.py).

Policy (as the PagedAttention paper's): when the free blocks cannot cover a pick, the latest-arriving
group is preempted, as a whole. Mechanism: a multi-sequence group (n > 1, beams) whose sequences all
stand at their next token swaps out to the CPU pool when that holds it; anything else is recomputed
later: its blocks are freed and it waits again, in arrival order, keeping its tokens. Swapped groups come
back first, oldest first, before any waiting request is admitted.

Invariants:
- A swapped sequence holds CPU blocks only and the workers hold nothing for it; it comes back as a
  new sequence that carries its computed tokens and computes its next one.
- A recomputed sequence holds no blocks and ``num_computed_tokens == 0`` while it waits.
- Preempting a pick's group gives back everything the step had reserved for it (budget, seats,
  blocks), so the rest of the step can use them.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.request import Request, SeqStatus, Sequence, arrival_order
from scheduler_svc.scheduler_stats import SchedulerStats
from scheduler_svc.step_budget import Pick, StepBudget
from scheduler_svc.step_plan import SchedulerOutput

_RUNNING = SeqStatus.RUNNING

# Which group to preempt next, given the running sequences (sorted by arrival_order, never empty).
Victim = Callable[[list[Sequence]], Request]


def latest_arrival(running: list[Sequence]) -> Request:
    """The policy: the group that arrived last (the earliest arrivals keep their progress)."""
    return running[-1].request


@dataclass(slots=True)
class SeqQueues:
    """The scheduler's queues of sequences, each sorted by arrival_order, and the sequences the workers
    must drop before the next step. Mutated in place, never replaced: scheduler and preemptor share them."""

    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)
    swapped: list[Sequence] = field(default_factory=list)
    dropped_seq_ids: list[int] = field(default_factory=list)

    def take_dropped(self) -> list[int]:
        dropped = list(self.dropped_seq_ids)
        self.dropped_seq_ids.clear()
        return dropped


class Preemptor:
    """Takes groups off the device (``make_room``) and brings swapped ones back (``swap_in``).

    ``fail(request, message)`` ends a group with an error; ``start(seq, num_new, out)`` schedules a
    sequence the workers do not hold (both the scheduler's)."""

    def __init__(self, kv: KVCacheManager, queues: SeqQueues, stats: SchedulerStats, max_num_seqs: int,
                 watermark_blocks: int, fail: Callable[[Request, str], None],
                 start: Callable[[Sequence, int, SchedulerOutput], None], victim: Victim = latest_arrival) -> None:
        self.kv = kv
        self.queues = queues
        self.stats = stats
        self.max_num_seqs = max_num_seqs
        self.watermark_blocks = watermark_blocks
        self.fail = fail
        self.start = start
        self.victim = victim

    def make_room(self, pick: Pick, step: StepBudget, out: SchedulerOutput) -> bool:
        """Preempts victims until the pick fits; False if the pick's own group went."""
        while self.kv.num_free_blocks - step.num_reserved_blocks < pick.num_blocks:
            victim = self.victim(self.queues.running)
            self.preempt(victim, step, out)
            if victim is pick.request:
                return False
        return True

    def preempt(self, request: Request, step: StepBudget, out: SchedulerOutput) -> None:
        """Takes the whole group off the device: swapped when it is a multi-sequence group in step and
        the CPU pool holds it, recomputed otherwise. Beams recomputed without the prefix cache would
        each need their own copy of the blocks they shared, and might never fit again: that fails."""
        step.unpick(request)
        live = [s for s in request.seqs if s.status is _RUNNING]
        ids = [s.seq_id for s in live]
        in_step = all(
            s.status is _RUNNING and s.num_tokens - s.num_computed_tokens == 1
            for s in request.seqs
            if s.status is not SeqStatus.FINISHED
        )
        if len(live) > 1 and in_step and self.kv.can_swap_out(ids):
            out.swap_out += self.kv.swap_out(ids)
            for seq in live:
                self._take_off(seq, SeqStatus.SWAPPED)
                bisect.insort(self.queues.swapped, seq, key=arrival_order)
            self.stats.num_swap_preemptions += len(live)
        elif request.beam is not None and len(request.seqs) > 1 and not self.kv.enable_caching:
            self.fail(request, "preempting a beam search needs CPU swap space (--swap-space) or prefix caching")
            return
        else:
            for seq in live:
                self.kv.free(seq.seq_id)
                self._take_off(seq, SeqStatus.WAITING)
                seq.num_computed_tokens = 0
                bisect.insort(self.queues.waiting, seq, key=arrival_order)  # back in arrival order
        request.num_preemptions += 1
        out.preempted += live
        self.stats.num_preemptions += len(live)

    def _take_off(self, seq: Sequence, status: SeqStatus) -> None:
        self.queues.running.remove(seq)
        seq.status = status
        seq.num_hashed_blocks = 0
        self.queues.dropped_seq_ids.append(seq.seq_id)

    def swap_in(self, step: StepBudget, out: SchedulerOutput) -> None:
        """Brings swapped groups back, oldest first; each computes its next token this step."""
        swapped, running = self.queues.swapped, self.queues.running
        while swapped:
            request = swapped[0].request
            group = [s for s in swapped[: request.max_num_seqs] if s.request is request]
            ids = [s.seq_id for s in group]
            if step.budget < len(group) or step.num_seqs + len(group) > self.max_num_seqs:
                return
            writes = [(s.seq_id, s.num_computed_tokens, s.num_computed_tokens + 1) for s in group]
            needed = self.kv.num_swap_in_blocks(ids) + self.kv.num_blocks_needed(writes, cpu=True)
            free = self.kv.num_free_blocks - (self.watermark_blocks if running else 0)
            if needed > free:
                return
            out.swap_in += self.kv.swap_in(ids)
            del swapped[: len(group)]
            for seq in group:
                seq.status = _RUNNING
                bisect.insort(running, seq, key=arrival_order)
                self.start(seq, 1, out)
            step.budget -= len(group)
            step.num_seqs += len(group)
