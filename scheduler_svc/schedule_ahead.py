"""Planning ahead: the scheduler's next step, planned while the previous one still runs on the workers.

The engine (scheduler_svc.engine) sends the plan this returns before it reads the previous step's
results, so the workers start it as soon as they are done; the plan therefore must not depend on those
results. ``AheadPlanner.plan`` says when it does not (and returns None): the common decode-only case
qualifies, forks, beams, swaps and preemption do not. A collaborator of the scheduler with an explicit
interface (its queues, its KV cache manager, its sequence groups and its admission), as the Preemptor is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.preemption import SeqQueues
from scheduler_svc.request import Sequence
from scheduler_svc.sequence_groups import SequenceGroups
from scheduler_svc.step_budget import StepBudget, capped_tokens
from scheduler_svc.step_plan import SchedulerOutput


@dataclass(slots=True)
class AheadPlanner:
    """Plans the step after one in flight, over the scheduler's queues (shared, read here) and its KV
    cache manager (whose blocks the plan takes). ``admit(step, out)`` admits waiting requests into a
    plan as the scheduler's own steps do (the scheduler's); the scheduler numbers the plan and closes
    the step (``Scheduler.schedule_ahead``)."""

    kv: KVCacheManager
    queues: SeqQueues
    groups: SequenceGroups
    max_num_batched_tokens: int
    max_model_len: int
    admit: Callable[[StepBudget, SchedulerOutput], None]
    max_prefill_tokens_with_decodes: int = 0  # as the scheduler's own steps cap them (StepBudget.cap_prefill)

    def plan(self, prev: SchedulerOutput, step_id: int) -> SchedulerOutput | None:
        """The step after ``prev`` (numbered ``step_id``), planned while ``prev`` still runs on the
        workers (its results not applied yet), or None where the plan would depend on them.

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
        if self.queues.swapped or self.groups.has_pending:
            return None
        if prev.preempted or prev.forks or prev.swap_out or prev.swap_in:
            return None
        planned = self._picks(prev)
        if planned is None:
            return None
        picks, budget = planned
        if self.kv.num_blocks_needed([(s.seq_id, a, b) for s, a, b in picks]) > self.kv.num_free_blocks:
            return None
        out = SchedulerOutput(step_id)
        step = StepBudget(budget, num_seqs=len(picks))
        for seq, start, end in picks:
            out.add_running(seq, end - start, self.kv.allocate_slots(seq.seq_id, start, end))
            step.budget -= end - start
        if step.budget > 0:
            self.admit(step, out)
        return None if out.is_empty else out

    def _picks(self, prev: SchedulerOutput) -> tuple[list[tuple[Sequence, int, int]], int] | None:
        """(sequence, start, end) of each running sequence's share of the step after ``prev``: decodes
        first, then prefill chunks, under the token budget; and that budget (capped for prefill where
        decodes run, StepBudget.cap_prefill). None where a sequence rules planning out."""
        scheduled = {id(s.seq): s.num_scheduled_tokens for s in chain(prev.new_seqs, prev.running)}
        running = self.queues.running
        if len(scheduled) < len(running):
            return None  # someone left out of prev (budget, seq cap) must not be skipped again
        picks: list[tuple[Sequence, int, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        max_model_len = self.max_model_len
        for seq in running:
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
        total = capped_tokens(self.max_num_batched_tokens, self.max_prefill_tokens_with_decodes, len(picks))
        budget = total - len(picks)
        if budget < 0:
            return None
        for seq, start in chunks:
            if budget == 0:
                break
            end = min(len(seq.token_ids), start + budget)
            picks.append((seq, start, end))
            budget -= end - start
        return picks, total
