"""Planning ahead: the scheduler's next step, planned while the previous one still runs on the workers.

The engine (scheduler_svc.engine) sends the plan this returns before it reads the previous step's
results, so the workers start it as soon as they are done; the plan therefore must not depend on those
results. ``schedule_ahead`` says when it does not (and returns None): the common decode-only case
qualifies, forks, beams, swaps and preemption do not.
"""

from __future__ import annotations

from collections import deque
from itertools import chain
from typing import TYPE_CHECKING

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.request import Sequence
from scheduler_svc.step_budget import StepBudget
from scheduler_svc.step_plan import SchedulerOutput

if TYPE_CHECKING:
    from scheduler_svc.preemption import SeqQueues
    from scheduler_svc.scheduler_stats import SchedulerStats
    from scheduler_svc.sequence_groups import SequenceGroups


class AheadPlanningMixin:
    """Scheduler methods that plan a step ahead, over the scheduler's state below."""

    config: SchedulerConfig
    kv: KVCacheManager
    max_model_len: int
    running: list[Sequence]
    waiting: deque[Sequence]
    swapped: list[Sequence]
    groups: SequenceGroups
    stats: SchedulerStats
    _next_step_id: int
    queues: SeqQueues

    if TYPE_CHECKING:  # the scheduler's own

        def _admit(self, step: StepBudget, out: SchedulerOutput) -> None: ...

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``prev``, planned while ``prev`` still runs on the workers (its results not
        applied yet), or None where the plan would depend on them.

        Qualifies: every running sequence is one request's only sequence and is in ``prev``; nothing
        is swapped or waits for a fork or a beam re-selection; the pool has the blocks without
        preempting. A sequence that samples in ``prev`` decodes the token ``prev`` samples (the
        workers keep their sampled tokens, so the plan needs only ids and block deltas); one still
        prefilling after ``prev`` computes its next chunk of known prompt tokens; then waiting
        requests are admitted as ``schedule`` admits them, with the blocks free now (``prev``'s
        results can only free more). A sequence that ``prev`` ends by length is left out; one that
        ``prev`` ends by a stop token, or that is aborted meanwhile, computes one extra token, which
        ``update`` ignores (it is no longer running) and whose KV slot lies past its end, in blocks
        freed by then, and any later step that reuses them runs after this one on the workers."""
        if self.swapped or self.groups.has_pending:
            return None
        if prev.preempted or prev.forks or prev.swap_out or prev.swap_in:
            return None
        picks = self._ahead_picks(prev)
        if picks is None or self.kv.num_blocks_needed([(s.seq_id, a, b) for s, a, b in picks]) > (
                self.kv.num_free_blocks):
            return None
        out = SchedulerOutput(self._next_step_id)
        step = StepBudget(self.config.max_num_batched_tokens, num_seqs=len(picks))
        for seq, start, end in picks:
            out.add_running(seq, end - start, self.kv.allocate_slots(seq.seq_id, start, end))
            step.budget -= end - start
        if step.budget > 0:
            self._admit(step, out)
        if out.is_empty:
            return None
        self._next_step_id += 1
        out.finished_seq_ids = self.queues.take_dropped()
        self.stats.num_steps += 1
        self.stats.num_ahead_steps += 1
        return out

    def _ahead_picks(self, prev: SchedulerOutput) -> list[tuple[Sequence, int, int]] | None:
        """(sequence, start, end) of each running sequence's share of the step after ``prev``: decodes
        first, then prefill chunks, under the token budget; None where a sequence rules planning out."""
        scheduled = {id(s.seq): s.num_scheduled_tokens for s in chain(prev.new_seqs, prev.running)}
        if len(scheduled) < len(self.running):
            return None  # someone left out of prev (budget, seq cap) must not be skipped again
        picks: list[tuple[Sequence, int, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        max_model_len = self.max_model_len
        for seq in self.running:
            n = scheduled.get(id(seq))
            request = seq.request
            if n is None or request.beam is not None or request.num_pending_forks or len(request.seqs) > 1:
                return None
            num_tokens = len(seq.token_ids)
            computed = seq.num_computed_tokens + n  # once prev has run
            if computed < num_tokens:
                chunks.append((seq, computed))  # still prefilling: its next tokens are known
                continue
            if num_tokens + 1 - len(request.prompt_token_ids) >= request.max_tokens or num_tokens + 1 >= max_model_len:
                continue  # prev's token ends it
            picks.append((seq, num_tokens, num_tokens + 1))
        budget = self.config.max_num_batched_tokens - len(picks)
        if budget < 0:
            return None
        for seq, start in chunks:
            if budget == 0:
                break
            end = min(len(seq.token_ids), start + budget)
            picks.append((seq, start, end))
            budget -= end - start
        return picks
