"""Iteration-level (continuous) batching with paged KV blocks, shared between sequences.

Each step has two phases. First the running sequences are picked, decodes first, then prefill
chunks in progress, oldest first, under the token budget and the sequence cap; when the free blocks
cannot cover a pick, a victim group is preempted (scheduler_svc.preemption's Preemptor: the latest
arrival, swapped out or recomputed later). Then the picks take their blocks from the KV cache manager
(copy-on-write where they write into shared ones). If nothing was preempted, swapped groups come back
first, then waiting sequences are admitted first-come-first-served (reusing cached prefix blocks) while
the budget, the cap and the free blocks last: the head of the queue waits for blocks, nobody overtakes
it.

A request is a sequence group (scheduler_svc.sequence_groups): n parallel samples fork from the first
once it has computed prompt[:-1]; beams are re-selected after every step and always step together.

Invariants:
- ``running``, ``waiting`` and ``swapped`` are sorted by arrival (then seq_id), so a group's sequences
  are contiguous and the latest arrival is last.
- The KV cache manager holds a device table exactly for each running sequence, a CPU table for each
  swapped one, and nothing for waiting ones.
- Every sequence the workers hold is running; every sequence that stops running (finished, dropped,
  preempted, swapped) is in the next plan's ``finished_seq_ids``.
"""

from __future__ import annotations

import bisect
from collections import deque
from itertools import chain

from gpu_worker.sampling_params import InvalidField, SamplingParams
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.kv_cache_manager import KVCacheManager, PrefixHit
from scheduler_svc.kv_events import KVEventLog
from scheduler_svc.preemption import Preemptor, SeqQueues
from scheduler_svc.request import (
    FinishReason,
    QueueFull,
    Request,
    RequestLimits,
    SeqOutput,
    SeqStatus,
    Sequence,
    WorkerSeqError,
    arrival_order,
    failure_message,
    take_prompt_logprobs,
    validate_request,
)
from scheduler_svc.schedule_ahead import AheadPlanner
from scheduler_svc.scheduler_stats import SchedulerStats
from scheduler_svc.sequence_groups import SequenceGroups
from scheduler_svc.step_budget import Pick, StepBudget
from scheduler_svc.step_plan import ForkedSeq, ScheduledSeq, SchedulerOutput

_RUNNING = SeqStatus.RUNNING
# Plain ints: protobuf enum attribute lookups are slow on the per-token path.
_STOP = int(FinishReason.STOP)
_LENGTH = int(FinishReason.LENGTH)
_NOT_FINISHED = int(FinishReason.UNSPECIFIED)
INTERNAL = 13  # google.rpc.Code of a request whose processing raised


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: list[int],
        vocab_size: int | None = None,
        num_cpu_blocks: int = 0,
        kv_events: KVEventLog | None = None,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.max_model_len = min(max_model_len, config.max_model_len or max_model_len)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = vocab_size
        self.pool = BlockPool(num_blocks, enable_caching=config.enable_prefix_caching, events=kv_events)
        self.cpu_pool = BlockPool(num_cpu_blocks) if num_cpu_blocks > 0 else None
        self.kv = KVCacheManager(self.pool, config.block_size, self.cpu_pool)
        # Sorted by arrival_order (waiting: new requests append, preempted ones insert); shared with the preemptor.
        self.queues = SeqQueues()
        self.waiting: deque[Sequence] = self.queues.waiting
        self.running: list[Sequence] = self.queues.running
        self.swapped: list[Sequence] = self.queues.swapped
        self.requests: dict[tuple[int, str], Request] = {}
        self.stats = SchedulerStats()
        self.limits = RequestLimits(self.max_model_len, config.block_size, num_blocks,
                                    min(config.max_num_seqs, config.max_num_batched_tokens), vocab_size)
        self._watermark_blocks = int(config.watermark * num_blocks)
        self._next_arrival = 0
        self._next_seq_id = 0
        self._next_step_id = 0
        self._pending_outputs: list[SeqOutput] = []  # failures found while scheduling
        self.groups = SequenceGroups(self.kv, self.running, self._retire, self._new_seq_id)
        self.preemptor = Preemptor(self.kv, self.queues, self.stats, config.max_num_seqs, self._watermark_blocks,
                                   self._fail, self._start)
        self.ahead = AheadPlanner(self.kv, self.queues, self.groups, config.max_num_batched_tokens, self.max_model_len,
                                  self._admit, config.max_prefill_tokens_with_decodes)

    # ---- requests in and out

    def add_request(
        self, stream_id: int, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Request:
        """Admits a request to the waiting queue; raises InvalidField when it can never run, QueueFull
        when the queue is at its bound (an invalid request is refused as such even then)."""
        key = (stream_id, request_id)
        if key in self.requests:
            raise InvalidField("request_id", f"{request_id!r} is already running on this stream")
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        validate_request(prompt_token_ids, params, stop_ids, self.limits)
        bound = self.config.max_num_waiting
        if bound and len(self.waiting) >= bound and (num_waiting := self.num_blocked_waiting()) >= bound:
            raise QueueFull(f"the server is at capacity: {num_waiting} sequences are waiting for admission "
                            f"(--max-num-waiting {bound}); retry later")
        request = Request(request_id, stream_id, list(prompt_token_ids), params, self._next_arrival, stop_ids)
        self._next_arrival += 1
        seq = Sequence(self._new_seq_id(), request, list(prompt_token_ids))
        request.seqs.append(seq)
        SequenceGroups.start(request, self.limits.longest(prompt_token_ids, params))
        self.requests[key] = request
        self.waiting.append(seq)
        return request

    def abort_request(self, stream_id: int, request_id: str) -> list[SeqOutput]:
        """Ends a request now; its blocks are free when this returns. Unknown ids are ignored."""
        request = self.requests.get((stream_id, request_id))
        if request is None:
            return []
        outputs = [
            self.finish(seq, FinishReason.ABORT)
            for seq in list(request.seqs)
            if seq.status is not SeqStatus.FINISHED
        ]
        return outputs[:1] if request.beam is not None else outputs  # beams: one report, index 0

    def abort_stream(self, stream_id: int) -> list[SeqOutput]:
        outputs = []
        for s_id, r_id in [k for k in self.requests if k[0] == stream_id]:
            outputs += self.abort_request(s_id, r_id)
        return outputs

    def num_blocked_waiting(self) -> int:
        """Waiting sequences that the next schedule could not admit for want of room: those after the
        longest head of the queue that fits the free sequence seats and blocks now (first come, first
        served, as ``_admit`` takes them; a prompt's cached prefix is not counted, so this errs
        towards waiting). A burst at an idle engine is about to run, not waiting, and
        ``max_num_waiting`` bounds only these. Walks the admissible head: at most ``max_num_seqs``."""
        if self.swapped:
            return len(self.waiting)  # swapped groups come back before anyone is admitted
        seats = self.config.max_num_seqs - len(self.running)
        blocks = self.kv.num_free_blocks - (self._watermark_blocks if self.running else 0)
        admissible = 0
        for seq in self.waiting:
            forks = seq.request.num_pending_forks
            seats -= 1 + forks
            blocks -= self.kv.num_blocks_for(seq.num_tokens) + forks
            if seats < 0 or blocks < 0:
                break
            admissible += 1
        return len(self.waiting) - admissible

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- one step

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(self._next_step_id)
        self._next_step_id += 1
        step = StepBudget(self.config.max_num_batched_tokens)
        self._pick_running(step, out)
        self._place(step.picks, out)
        if not out.preempted:
            self.preemptor.swap_in(step, out)
            if not self.swapped:
                self._admit(step, out)
        if out.is_empty and not out.preempted and self.has_work():
            self._fail_stuck()
        self.groups.take_pending(out)
        out.finished_seq_ids = self.queues.take_dropped()
        self.stats.num_steps += 1
        return out

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``prev``, planned while ``prev`` still runs on the workers, or None where the plan
        would depend on ``prev``'s results (scheduler_svc.schedule_ahead says when)."""
        out = self.ahead.plan(prev, self._next_step_id)
        if out is None:
            return None
        self._next_step_id += 1
        out.finished_seq_ids = self.queues.take_dropped()
        self.stats.num_steps += 1
        self.stats.num_ahead_steps += 1
        return out

    def _pick_running(self, step: StepBudget, out: SchedulerOutput) -> None:
        """Phase one: which running sequences compute how many tokens; preempts to make room."""
        decodes: list[Sequence] = []
        chunks: list[Sequence] = []
        for s in self.running:
            remaining = len(s.token_ids) - s.num_computed_tokens
            if remaining == 1:
                decodes.append(s)
            elif remaining > 1:
                chunks.append(s)
        step.cap_prefill(self.config.max_prefill_tokens_with_decodes, len(decodes))
        grouped: set[int] = set()  # beam groups already picked as a whole
        cap = self.config.max_num_seqs
        kv = self.kv
        for seq in chain(decodes, chunks):
            if step.budget == 0:
                break
            if seq.status is not _RUNNING or id(seq.request) in grouped:
                continue
            pick = self._pick(seq, step.budget)
            if pick is None:
                continue
            num_seqs = len(pick.slots) + pick.num_forks
            if step.num_seqs + num_seqs > cap:
                continue
            if num_seqs > 1:
                grouped.add(id(pick.request))
            # Picks so far fit the free blocks, so a pick that takes none fits too.
            if pick.num_blocks and kv.num_free_blocks - step.num_reserved_blocks < pick.num_blocks and not (
                self.preemptor.make_room(pick, step, out)
            ):
                continue
            step.picks.append(pick)
            step.num_reserved_blocks += pick.num_blocks
            step.num_seqs += num_seqs
            step.budget -= pick.num_forks + (pick.slots[0][1] if num_seqs == 1 else sum(n for _, n in pick.slots))

    def _pick(self, seq: Sequence, budget: int) -> Pick | None:
        request = seq.request
        start = seq.num_computed_tokens
        remaining = len(seq.token_ids) - start
        if request.beam is None and not request.num_pending_forks:
            n = min(remaining, budget)  # the common case, kept cheap: one sequence
            return Pick(request, [(seq, n)], 0, self.kv.num_blocks_to_write(seq.seq_id, start, start + n))
        if request.beam is not None and len(request.seqs) > 1:
            beams = request.seqs
            if all(b.status is _RUNNING and b.num_tokens - b.num_computed_tokens == 1 for b in beams):
                if budget < len(beams):
                    return None
                slots = [(b, 1) for b in beams]  # beams step together
            elif remaining > 1:
                slots = [(seq, min(remaining - 1, budget))]  # catch up, then wait for the others
            else:
                return None
        elif request.num_pending_forks:
            if remaining == 1:  # prompt[:-1] is computed: fork the samples and sample all together
                n = 1 + request.num_pending_forks
                if budget < n:
                    return None
                return Pick(request, [(seq, 1)], n - 1, self.kv.num_blocks_to_fork(seq.seq_id, start, n))
            slots = [(seq, min(remaining - 1, budget))]
        else:
            slots = [(seq, min(remaining, budget))]
        blocks = self.kv.num_blocks_needed(
            [(s.seq_id, s.num_computed_tokens, s.num_computed_tokens + n) for s, n in slots]
        )
        return Pick(request, slots, 0, blocks)

    def _place(self, picks: list[Pick], out: SchedulerOutput) -> None:
        """Phase two: the picks take their blocks; forks first, copy-on-write as they write."""
        running = out.running
        for pick in picks:
            slots = pick.slots
            if not pick.num_blocks and not pick.num_forks:  # neither new blocks nor copies: most decodes
                if len(slots) == 1:
                    running.append(ScheduledSeq(slots[0][0], slots[0][1], []))
                else:
                    running += [ScheduledSeq(seq, n, []) for seq, n in slots]
                continue
            if pick.num_forks:
                parent = slots[0][0]
                children = self.groups.fork_samples(parent, pick.num_forks)
                out.forks += [ForkedSeq(parent.seq_id, c) for c in children]
                slots = slots + [(c, 1) for c in children]
            for seq, n in slots:
                start = seq.num_computed_tokens
                out.add_running(seq, n, self.kv.allocate_slots(seq.seq_id, start, start + n))

    def _start(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> None:
        """Schedules a sequence that the workers do not hold: it travels in full."""
        start = seq.num_computed_tokens
        alloc = self.kv.allocate_slots(seq.seq_id, start, start + num_new)
        out.add_new(seq, num_new, alloc, self.kv.block_table(seq.seq_id))

    # ---- admission

    def _admit(self, step: StepBudget, out: SchedulerOutput) -> None:
        while self.waiting and step.budget > 0 and self._admit_head(step, out):
            pass

    def _admit_head(self, step: StepBudget, out: SchedulerOutput) -> bool:
        """Admits the head of the waiting queue if it fits; False when it has to wait."""
        seq = self.waiting[0]
        request = seq.request
        seats = request.max_num_seqs - sum(s.status is _RUNNING for s in request.seqs)
        if len(self.running) + seats > self.config.max_num_seqs:
            return False
        # Prompt logprobs are computed, never served from the cache (the cache holds KV, not logits).
        hit = PrefixHit([], self.kv.block_size) if request.prompt_logprobs_pending else self.kv.cached_prefix(seq)
        num_cached = hit.num_tokens
        fork_now = request.num_pending_forks > 0 and num_cached == seq.num_tokens - 1
        if fork_now:
            num_new = 1
            num_seqs = 1 + request.num_pending_forks
            if step.budget < num_seqs:
                return False
            needed = num_seqs  # the last prompt token starts a block: one new block per sample
        else:
            target = seq.num_tokens
            if request.num_pending_forks or (request.beam is not None and len(request.seqs) > 1):
                target -= 1  # stop before the last token: the group samples it together
                if num_cached == target:
                    hit.drop_last()
                    num_cached = hit.num_tokens
            num_new = min(target - num_cached, step.budget)
            num_seqs = 1
            needed = self.kv.num_blocks_for(num_cached + num_new) - hit.num_blocks
        free = self.kv.num_free_blocks_after(hit)
        if needed > free - (self._watermark_blocks if self.running else 0):
            return False  # FCFS: the head waits for blocks; nobody overtakes it
        self.waiting.popleft()
        self.kv.adopt_prefix(seq, hit)
        self._note_cached(seq, num_cached)
        seq.status = _RUNNING
        bisect.insort(self.running, seq, key=arrival_order)
        # Samples fork before anyone writes: they share the cached prefix, each gets its own block.
        children = self.groups.fork_samples(seq, request.num_pending_forks) if fork_now else []
        for s in [seq, *children]:
            self._start(s, num_new, out)
        step.budget -= num_new + num_seqs - 1
        step.num_seqs += num_seqs
        return True

    def _note_cached(self, seq: Sequence, num_cached: int) -> None:
        seq.num_computed_tokens = num_cached
        cached_prompt = min(num_cached, seq.num_prompt_tokens)
        self.stats.num_cached_prompt_tokens += cached_prompt
        self.stats.num_queried_prompt_tokens += seq.num_prompt_tokens
        request = seq.request
        if seq.num_output_tokens == 0 and request.num_preemptions == 0:
            request.num_cached_tokens = cached_prompt  # first admission

    def _fail_stuck(self) -> None:
        """Nothing can run, and nothing will free blocks: the head group can never fit. Fail it."""
        head = self.swapped[0] if self.swapped else self.waiting[0] if self.waiting else self.running[0]
        self._fail(head.request, "the request does not fit the KV cache alongside its own sequences")

    def _fail(self, request: Request, message: str) -> None:
        """Ends the whole group with an error, reported with the next update."""
        seq = next(s for s in request.seqs if s.status is not SeqStatus.FINISHED)
        output = self.finish(seq, FinishReason.ERROR)  # ends the siblings too
        output.error = message
        self._pending_outputs.append(output)

    # ---- results

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[int, int],
        logprobs: dict[int, float] | None = None,
        top: dict[int, tuple[list[int], list[float]]] | None = None,
        prompt_logprobs: dict | None = None,
        seq_errors: dict[int, str] | None = None,
    ) -> list[SeqOutput]:
        """Applies a step's result: ``sampled`` maps seq_id -> token for sequences that sampled;
        ``top`` their top candidates (needed by beam search); ``seq_errors`` the sequences whose own
        sampling failed on the worker (their requests fail alone)."""
        results, self._pending_outputs = self._pending_outputs, []
        beam_rows: dict[int, tuple[Request, dict[int, tuple[list[int], list[float]]]]] = {}
        for sched in chain(out.new_seqs, out.running):
            seq = sched.seq
            if seq.status is not _RUNNING:
                continue  # aborted while the step ran (or its request failed below)
            try:
                if seq_errors and seq.seq_id in seq_errors:
                    raise WorkerSeqError(seq_errors[seq.seq_id])
                output = self._apply(sched, sampled, logprobs, top, prompt_logprobs, beam_rows)
            except Exception as exc:  # one request's data must not end the engine: that request fails alone
                output = self.fail_request(seq.request, exc)
            if output is not None:
                results.append(output)
        for request, rows in beam_rows.values():
            if not any(s.status is _RUNNING for s in request.seqs):
                continue  # failed meanwhile
            try:
                results += self.groups.beam_step(request, rows)
            except Exception as exc:
                results.append(self.fail_request(request, exc))
                continue
            if request.beam.done:
                del self.requests[(request.stream_id, request.request_id)]
        return results

    def _apply(self, sched, sampled, logprobs, top, prompt_logprobs, beam_rows) -> SeqOutput | None:
        """One sequence's share of a step's result: its output, or None (mid-prefill, or a beam whose
        re-selection waits for its siblings in ``beam_rows``)."""
        seq = sched.seq
        num_prompt = len(seq.request.prompt_token_ids)
        if seq.num_computed_tokens < num_prompt:
            self.stats.num_computed_prompt_tokens += min(sched.num_scheduled_tokens,
                                                         num_prompt - seq.num_computed_tokens)
        seq.num_computed_tokens += sched.num_scheduled_tokens
        if self.kv.enable_caching:
            self.kv.cache_full_blocks(seq)
        prompt_lp = take_prompt_logprobs(seq, prompt_logprobs) if prompt_logprobs else None
        if seq.num_computed_tokens < seq.num_tokens:
            if seq.seq_id in sampled:
                raise RuntimeError(f"worker sampled for sequence {seq.seq_id} mid-prefill")
            return SeqOutput(seq, [], [], prompt_logprobs=prompt_lp) if prompt_lp is not None else None
        token = sampled.get(seq.seq_id)
        if token is None:
            raise RuntimeError(f"worker returned no token for sequence {seq.seq_id}")
        seq.token_ids.append(token)
        request = seq.request
        if request.beam is not None:
            if top is None or seq.seq_id not in top:
                raise RuntimeError(f"worker returned no candidates for beam {seq.seq_id}")
            beam_rows.setdefault(id(request), (request, {}))[1][seq.seq_id] = top[seq.seq_id]
            return None
        reason = self._stop_reason(seq, token)
        # A batch returns logprobs when any of its requests asks: pass on only what this one asked for.
        lp = [logprobs[seq.seq_id]] if logprobs and request.params.logprobs and seq.seq_id in logprobs else []
        output = self.finish(seq, reason, [token], lp) if reason else SeqOutput(seq, [token], lp)
        output.prompt_logprobs = prompt_lp
        k = request.num_top_logprobs
        if k and top is not None and seq.seq_id in top:
            ids, lps = top[seq.seq_id]
            output.top_logprobs = [(ids[:k], lps[:k])]
        return output

    def fail_request(self, request: Request, exc: BaseException) -> SeqOutput:
        """Ends a request whose processing raised, alone: every sequence of it (including any that a
        half-done beam re-selection forked) stops and frees its blocks, and the one output reports
        INTERNAL naming the exception. The engine and every other request go on."""
        message = failure_message(request.request_id, exc)
        orphans = [s for s in chain(self.running, self.waiting, self.swapped) if s.request is request]
        report = next((s for s in request.seqs if s.status is not SeqStatus.FINISHED), None)
        for seq in [*request.seqs, *orphans]:
            if seq.status is not SeqStatus.FINISHED:
                self.finish(seq, FinishReason.ERROR)
        self.requests.pop((request.stream_id, request.request_id), None)
        if report is None:  # nothing left running (a finished beam search): report as its first beam
            report = Sequence(self._new_seq_id(), request, [], status=SeqStatus.FINISHED)
        return SeqOutput(report, [], [], FinishReason.ERROR, error=message, status_code=INTERNAL)

    def _stop_reason(self, seq: Sequence, token: int) -> int:
        request = seq.request
        num_tokens = len(seq.token_ids)
        # min_tokens: the workers do not sample a stop token before then; this guards the rule anyway.
        if token in request.stop_token_ids and num_tokens - len(request.prompt_token_ids) >= request.params.min_tokens:
            return _STOP
        if num_tokens - len(request.prompt_token_ids) >= request.max_tokens or num_tokens >= self.max_model_len:
            return _LENGTH
        return _NOT_FINISHED

    def finish(self, seq: Sequence, reason: int, tokens=(), logprobs=()) -> SeqOutput:
        """Ends a sequence (an error ends its whole group) and frees its blocks."""
        if seq.status is _RUNNING:
            self._retire(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)  # waiting sequences hold no blocks
        elif seq.status is SeqStatus.SWAPPED:
            self.swapped.remove(seq)
            self.kv.free(seq.seq_id)  # the workers hold nothing for it
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        request = seq.request
        request.num_pending_forks = 0  # only the unforked first sequence can end with forks pending
        if reason == FinishReason.ERROR:
            for other in request.seqs:
                if other.status is not SeqStatus.FINISHED:
                    self.finish(other, reason)
        key = (request.stream_id, request.request_id)
        if key in self.requests and all(s.status is SeqStatus.FINISHED for s in request.seqs):
            del self.requests[key]
        return SeqOutput(seq, list(tokens), list(logprobs), reason)

    def _retire(self, seq: Sequence) -> None:
        """Ends a running sequence: the workers drop it, its blocks are freed."""
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        self.queues.dropped_seq_ids.append(seq.seq_id)
        seq.status = SeqStatus.FINISHED

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id - 1

