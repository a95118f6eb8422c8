"""Preemption and swapping: the part of the scheduler that takes groups off the device when blocks run
out, and brings swapped groups back.

Policy (as the PagedAttention paper's): when the free blocks cannot cover a pick, the latest-arriving
group is preempted, as a whole. A multi-sequence group (n > 1, beams) whose sequences all stand at
their next token swaps out to the CPU pool when that holds it; anything else is recomputed later:
its blocks are freed and it waits again, in arrival order, keeping its tokens. Swapped groups come
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
from typing import TYPE_CHECKING

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.request import Request, SeqStatus, Sequence, arrival_order
from scheduler_svc.step_plan import SchedulerOutput

if TYPE_CHECKING:
    from scheduler_svc.scheduler_stats import SchedulerStats
    from scheduler_svc.step_budget import Pick, StepBudget

_RUNNING = SeqStatus.RUNNING


class PreemptionMixin:
    """Scheduler methods for preemption and swap-in, over the scheduler's state below."""

    config: SchedulerConfig
    kv: KVCacheManager
    running: list[Sequence]  # the queues, each sorted by arrival_order
    waiting: deque[Sequence]
    swapped: list[Sequence]
    stats: SchedulerStats
    _watermark_blocks: int
    _dropped_seq_ids: list[int]

    if TYPE_CHECKING:  # the scheduler's own

        def _fail(self, request: Request, message: str) -> None: ...
        def _start(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> None: ...

    def _make_room(self, pick: Pick, step: StepBudget, out: SchedulerOutput) -> bool:
        """Preempts latest arrivals until the pick fits; False if the pick's own group went."""
        while self.kv.num_free_blocks - step.num_reserved_blocks < pick.num_blocks:
            victim = self.running[-1].request
            self._preempt(victim, step, out)
            if victim is pick.request:
                return False
        return True

    def _preempt(self, request: Request, step: StepBudget, out: SchedulerOutput) -> None:
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
                bisect.insort(self.swapped, seq, key=arrival_order)
            self.stats.num_swap_preemptions += len(live)
        elif request.beam is not None and len(request.seqs) > 1 and not self.kv.enable_caching:
            self._fail(request, "preempting a beam search needs CPU swap space (--swap-space) or prefix caching")
            return
        else:
            for seq in live:
                self.kv.free(seq.seq_id)
                self._take_off(seq, SeqStatus.WAITING)
                seq.num_computed_tokens = 0
                bisect.insort(self.waiting, seq, key=arrival_order)  # back in arrival order, ahead of later ones
        request.num_preemptions += 1
        out.preempted += live
        self.stats.num_preemptions += len(live)

    def _take_off(self, seq: Sequence, status: SeqStatus) -> None:
        self.running.remove(seq)
        seq.status = status
        seq.num_hashed_blocks = 0
        self._dropped_seq_ids.append(seq.seq_id)

    def _swap_in(self, step: StepBudget, out: SchedulerOutput) -> None:
        """Brings swapped groups back, oldest first; each computes its next token this step."""
        while self.swapped:
            request = self.swapped[0].request
            group = [s for s in self.swapped[: request.max_num_seqs] if s.request is request]
            ids = [s.seq_id for s in group]
            if step.budget < len(group) or step.num_seqs + len(group) > self.config.max_num_seqs:
                return
            writes = [(s.seq_id, s.num_computed_tokens, s.num_computed_tokens + 1) for s in group]
            needed = self.kv.num_swap_in_blocks(ids) + self.kv.num_blocks_needed(writes, cpu=True)
            free = self.kv.num_free_blocks - (self._watermark_blocks if self.running else 0)
            if needed > free:
                return
            out.swap_in += self.kv.swap_in(ids)
            del self.swapped[: len(group)]
            for seq in group:
                seq.status = _RUNNING
                bisect.insort(self.running, seq, key=arrival_order)
                self._start(seq, 1, out)
            step.budget -= len(group)
            step.num_seqs += len(group)
