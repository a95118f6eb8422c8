"""Iteration-level (continuous) batching with paged KV blocks.

Each step: running sequences first (decodes, then prefill chunks in progress), oldest first, each
growing its block table; when blocks run out, the latest arrival is preempted by recompute (its blocks
freed, its tokens computed again later). Then, if nothing was preempted, waiting sequences are admitted
first-come-first-served while the token budget, the sequence cap and the free blocks last. Prompts
longer than the remaining token budget are computed in chunks over several steps.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from scheduler_svc.block_pool import BlockPool
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.request import FinishReason, Request, SeqOutput, SeqStatus, Sequence
from scheduler_svc.sampling_params import InvalidField

_ARRIVAL = lambda seq: seq.request.arrival  # noqa: E731


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_scheduled_tokens: int
    block_ids: list[int]  # new sequences: the whole table; running ones: blocks added this step


@dataclass(slots=True)
class SchedulerOutput:
    step_id: int
    new_seqs: list[ScheduledSeq] = field(default_factory=list)
    running: list[ScheduledSeq] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # finished, aborted or preempted
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.new_seqs) + sum(
            s.num_scheduled_tokens for s in self.running
        )

    @property
    def is_empty(self) -> bool:
        return not (self.new_seqs or self.running)


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_computed_prompt_tokens: int = 0  # prompt tokens computed (not served from cache)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: list[int],
        vocab_size: int | None = None,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.max_model_len = min(max_model_len, config.max_model_len or max_model_len)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.vocab_size = vocab_size
        self.pool = BlockPool(num_blocks)
        self.kv = KVCacheManager(self.pool, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival
        self.requests: dict[tuple[int, str], Request] = {}
        self.stats = SchedulerStats()
        self._watermark_blocks = int(config.watermark * num_blocks)
        self._next_arrival = 0
        self._next_seq_id = 0
        self._next_step_id = 0
        self._dropped_seq_ids: list[int] = []  # workers drop these before the next step

    # ---- requests in and out

    def add_request(self, stream_id: int, request_id: str, prompt_token_ids: list[int], params) -> Request:
        """Admits a request to the waiting queue; raises InvalidField when it can never run."""
        key = (stream_id, request_id)
        if key in self.requests:
            raise InvalidField("request_id", f"{request_id!r} is already running on this stream")
        if not prompt_token_ids:
            raise InvalidField("prompt", "must not be empty")
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in prompt_token_ids):
            bad = next(t for t in prompt_token_ids if not 0 <= t < self.vocab_size)
            raise InvalidField("prompt", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidField(
                "prompt",
                f"{len(prompt_token_ids)} tokens leave no room to generate within the context "
                f"length {self.max_model_len}",
            )
        if params.max_tokens < 1:
            raise InvalidField("max_tokens", f"must be at least 1, got {params.max_tokens}")
        longest = min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
        if self.kv.num_blocks_for(longest) > self.pool.num_blocks:
            raise InvalidField(
                "max_tokens",
                f"prompt ({len(prompt_token_ids)} tokens) plus max_tokens ({params.max_tokens}) needs "
                f"{self.kv.num_blocks_for(longest)} KV blocks; the pool has {self.pool.num_blocks}",
            )
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        request = Request(
            request_id, stream_id, list(prompt_token_ids), params, self._next_arrival, stop_ids
        )
        self._next_arrival += 1
        seq = Sequence(self._next_seq_id, request, list(prompt_token_ids))
        self._next_seq_id += 1
        request.seqs.append(seq)
        self.requests[key] = request
        self.waiting.append(seq)
        return request

    def abort_request(self, stream_id: int, request_id: str) -> list[SeqOutput]:
        """Ends a request now; its blocks are free when this returns. Unknown ids are ignored."""
        request = self.requests.get((stream_id, request_id))
        if request is None:
            return []
        return [
            self.finish(seq, FinishReason.FINISH_REASON_ABORT)
            for seq in request.seqs
            if seq.status is not SeqStatus.FINISHED
        ]

    def abort_stream(self, stream_id: int) -> list[SeqOutput]:
        outputs = []
        for s_id, r_id in [k for k in self.requests if k[0] == stream_id]:
            outputs += self.abort_request(s_id, r_id)
        return outputs

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(self._next_step_id)
        self._next_step_id += 1
        budget = self.config.max_num_batched_tokens
        # Decodes first, then prefill chunks in progress; each group oldest first.
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        chunks = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + chunks:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + num_new, out):
                continue
            new_ids = self.kv.allocate(seq.seq_id, seq.num_computed_tokens + num_new)
            out.running.append(ScheduledSeq(seq, num_new, new_ids))
            budget -= num_new
        if not out.preempted:
            self._admit(out, budget)
        out.finished_seq_ids = self._dropped_seq_ids
        self._dropped_seq_ids = []
        self.stats.num_steps += 1
        return out

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempts latest arrivals until ``seq`` can grow to ``num_tokens``; False if seq itself went."""
        while not self.kv.can_allocate(seq.seq_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            needed = self.kv.num_new_blocks(seq.seq_id, seq.num_computed_tokens + num_new)
            if needed > self.pool.num_free_blocks - self._watermark_blocks and self.running:
                break  # FCFS: the head waits for blocks; nobody overtakes it
            if needed > self.pool.num_free_blocks:
                break
            self.waiting.popleft()
            self.kv.allocate(seq.seq_id, seq.num_computed_tokens + num_new)
            seq.status = SeqStatus.RUNNING
            bisect.insort(self.running, seq, key=_ARRIVAL)
            out.new_seqs.append(ScheduledSeq(seq, num_new, self.kv.block_ids(seq.seq_id)))
            budget -= num_new

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute preemption: free the blocks, forget computed tokens, wait at the front."""
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.request.num_preemptions += 1
        self.waiting.appendleft(seq)
        self._dropped_seq_ids.append(seq.seq_id)
        out.preempted.append(seq)
        self.stats.num_preemptions += 1

    # ---- results

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[int, int],
        logprobs: dict[int, float] | None = None,
    ) -> list[SeqOutput]:
        """Applies a step's result: ``sampled`` maps seq_id -> token for sequences that sampled."""
        results = []
        for sched in out.new_seqs + out.running:
            seq = sched.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.num_computed_prompt_tokens += min(
                    sched.num_scheduled_tokens, seq.num_prompt_tokens - seq.num_computed_tokens
                )
            seq.num_computed_tokens += sched.num_scheduled_tokens
            if seq.num_computed_tokens < seq.num_tokens:
                if seq.seq_id in sampled:
                    raise RuntimeError(f"worker sampled for sequence {seq.seq_id} mid-prefill")
                continue
            token = sampled.get(seq.seq_id)
            if token is None:
                raise RuntimeError(f"worker returned no token for sequence {seq.seq_id}")
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            lp = [logprobs[seq.seq_id]] if logprobs and seq.seq_id in logprobs else []
            if reason:
                results.append(self.finish(seq, reason, [token], lp))
            else:
                results.append(SeqOutput(seq, [token], lp))
        return results

    def _stop_reason(self, seq: Sequence, token: int) -> int:
        num_out = seq.num_output_tokens
        if token in seq.request.stop_token_ids:
            return FinishReason.FINISH_REASON_STOP
        if num_out >= seq.request.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.FINISH_REASON_LENGTH
        return FinishReason.FINISH_REASON_UNSPECIFIED

    def finish(self, seq: Sequence, reason: int, tokens=(), logprobs=()) -> SeqOutput:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq.seq_id)
            self._dropped_seq_ids.append(seq.seq_id)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)  # waiting sequences hold no blocks
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        request = seq.request
        if all(s.status is SeqStatus.FINISHED for s in request.seqs):
            del self.requests[(request.stream_id, request.request_id)]
        return SeqOutput(seq, list(tokens), list(logprobs), reason)
