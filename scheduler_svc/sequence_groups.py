"""Sequence groups: the parallel samples (n > 1) and the beams of one request, and their forks.

Parallel sampling: the first sequence computes prompt[:-1]; the other n-1 samples then fork from it,
sharing every block (one more reference each), and all n compute the last prompt token in one step
and sample independently. Sample 0 keeps the request's seed, so n = 1 and sample 0 of n > 1 agree;
sample i > 0 draws with ``sample_seed(seed, i)``.

Beam search: one sequence computes the prompt; after every step the beams are re-selected from the
workers' top candidates (scheduler_svc.beam_search). A beam picked once continues in place (its last,
not yet computed token replaced when another candidate won); a beam picked again forks, the child
taking its own last token; a beam not picked is dropped and its blocks are freed. Live beams always
step together, so they are picked, preempted and swapped as a whole.

Invariants:
- A beam search's ``request.seqs`` holds its live beams, best first, each ``index`` its rank.
- Forks and last-token replacements that an update decides reach the workers in the next plan, and
  only for sequences still running when it is made.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import replace

from scheduler_svc.beam_search import BeamSearch
from scheduler_svc.kv_cache_manager import KVCacheManager
from scheduler_svc.request import (
    FinishReason,
    Request,
    SeqOutput,
    SeqStatus,
    Sequence,
    arrival_order,
    sample_seed,
)
from scheduler_svc.step_plan import ForkedSeq, SchedulerOutput

_RUNNING = SeqStatus.RUNNING


class SequenceGroups:
    """Forks and beam re-selection. Children join ``running`` (the scheduler's queue, kept in arrival
    order) sharing their parent's blocks; ``retire`` ends a running sequence silently (the workers
    drop it, its blocks are freed); ``new_seq_id`` hands out sequence ids."""

    def __init__(
        self,
        kv: KVCacheManager,
        running: list[Sequence],
        retire: Callable[[Sequence], None],
        new_seq_id: Callable[[], int],
    ) -> None:
        self.kv = kv
        self.running = running
        self._retire = retire
        self._new_seq_id = new_seq_id
        self._pending_forks: list[ForkedSeq] = []  # beam forks for the next plan
        self._pending_last_tokens: list[Sequence] = []  # beams whose last token the next plan sets

    @staticmethod
    def start(request: Request, max_num_tokens: int) -> None:
        """Shapes a new request's group from its parameters: a beam search, or samples to fork later."""
        params = request.params
        if params.beam_width > 1:
            request.beam = BeamSearch(
                params.beam_width, len(request.prompt_token_ids), max_num_tokens, request.stop_token_ids,
                params.length_penalty, params.early_stopping,
            )
            request.seqs[0].params = params.for_beams()
            request.num_top_logprobs = request.beam.num_candidates
        elif params.n > 1:
            request.num_pending_forks = params.n - 1

    @property
    def has_pending(self) -> bool:
        """Whether the next plan carries forks or last tokens that the last update decided."""
        return bool(self._pending_forks or self._pending_last_tokens)

    def take_pending(self, out: SchedulerOutput) -> None:
        """Puts the pending forks (ahead of the plan's own) and last tokens into ``out``."""
        out.forks[:0] = [f for f in self._pending_forks if f.child.status is _RUNNING]
        out.last_tokens = [(s.seq_id, s.token_ids[-1]) for s in self._pending_last_tokens if s.status is _RUNNING]
        self._pending_forks, self._pending_last_tokens = [], []

    # ---- parallel sampling

    def fork_samples(self, parent: Sequence, count: int) -> list[Sequence]:
        """``count`` samples that share every block of ``parent``, each with its own seed."""
        request = parent.request
        params = request.params
        children = []
        for _ in range(count):
            child = self._child(parent, list(parent.token_ids), len(request.seqs))
            if params.seed is not None:
                child.params = replace(params, seed=sample_seed(params.seed, child.index))
            request.seqs.append(child)
            children.append(child)
        request.num_pending_forks = 0
        return children

    def _child(self, parent: Sequence, token_ids: list[int], index: int) -> Sequence:
        child = Sequence(
            self._new_seq_id(), parent.request, token_ids, index=index,
            num_computed_tokens=parent.num_computed_tokens, status=_RUNNING, params=parent.params,
            block_hashes=list(parent.block_hashes), num_hashed_blocks=parent.num_hashed_blocks,
        )
        self.kv.fork(parent.seq_id, child.seq_id)
        bisect.insort(self.running, child, key=arrival_order)
        return child

    # ---- beam search

    def beam_step(self, request: Request, rows: dict[int, tuple[list[int], list[float]]]) -> list[SeqOutput]:
        """Re-selects the beams from their top candidates (``rows``: seq_id -> token ids, logprobs):
        survivors continue (forking for extra picks), the rest are dropped. Returns the hypotheses,
        best first, once the search is over (``request.beam.done``), else nothing."""
        beams = request.seqs  # best first
        if len(rows) != len(beams):
            raise RuntimeError(f"beams of {request.request_id!r} did not step together")
        num_prompt = len(request.prompt_token_ids)
        tops = [rows[b.seq_id] for b in beams]
        assert request.beam is not None
        chosen = request.beam.step(
            [b.beam_score for b in beams], [b.token_ids[num_prompt:-1] for b in beams],
            [t[0] for t in tops], [t[1] for t in tops],
        )
        if request.beam.done:
            return self._finish_beams(request)
        kept: list[Sequence] = []
        continued: set[int] = set()
        for c in chosen:
            parent = beams[c.beam]
            if c.beam in continued:
                child = self._child(parent, parent.token_ids[:-1] + [c.token_id], len(kept))
                child.beam_score = c.score
                self._pending_forks.append(ForkedSeq(parent.seq_id, child, c.token_id))
                kept.append(child)
                continue
            continued.add(c.beam)
            if parent.token_ids[-1] != c.token_id:
                parent.token_ids[-1] = c.token_id
                self._pending_last_tokens.append(parent)
            parent.beam_score = c.score
            parent.index = len(kept)
            kept.append(parent)
        for i, beam in enumerate(beams):
            if i not in continued:
                self._retire(beam)
        request.seqs = kept
        return []

    def _finish_beams(self, request: Request) -> list[SeqOutput]:
        """Ends the live beams and reports the best hypotheses, best first (index 0), as transformers
        orders them."""
        for beam in request.seqs:
            self._retire(beam)
        request.seqs = []
        assert request.beam is not None
        outputs = []
        for i, hyp in enumerate(request.beam.finished):
            stopped = bool(hyp.token_ids) and hyp.token_ids[-1] in request.stop_token_ids
            reason = FinishReason.STOP if stopped else FinishReason.LENGTH
            seq = Sequence(self._new_seq_id(), request, request.prompt_token_ids + hyp.token_ids, index=i,
                           status=SeqStatus.FINISHED, finish_reason=reason)
            outputs.append(SeqOutput(seq, [], [], reason, final_token_ids=list(hyp.token_ids)))
        return outputs
