"""Runs one StepPlan: applies its deltas to the persistent per-sequence state, builds the flattened
varlen batch, runs the model over the paged KV pool and samples.

The scheduler decides which blocks hold what; the runner only follows the plan. A sequence samples a
token in a step exactly when the step's tokens reach the end of its known tokens. On CUDA, decode-only
steps replay captured graphs; everything else runs eagerly.

A step is launched, then finished. Greedy steps without logprobs (the common case) sample on the
device and copy the tokens to pinned host memory behind an event; their sequences get a placeholder
token until ``finish`` reads the tokens back. A plain decode step planned ahead by the scheduler can
be launched before the previous step is finished (``can_follow``): its inputs take the previous
step's tokens on the device, so the host prepares step N+1 while the GPU runs step N and the only
host sync per step is the one read of sampled tokens.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from gpu_worker import log
from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.cpu_linears import pack_linears
from gpu_worker.cuda_graphs import DecodeGraphs
from gpu_worker.grammar import GrammarCache, SeqGrammar, apply_masks, token_masks
from gpu_worker.input_batch import BlockTableRows, StepInputs, build_inputs
from gpu_worker.kv_pool import KVPool
from gpu_worker.prompt_logprobs import prompt_logprob_rows
from gpu_worker.sampler import SampleRequest, SampleResult, sample
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.staging import HostStaging
from gpu_worker.step_io import Fork, StepOutput, StepPlan

PLACEHOLDER = -1  # token id of a sampled token not read back yet
_logger = log.get_logger()


@dataclass(slots=True)
class PendingStep:
    """A launched step whose sampled tokens are still on their way to the host."""

    result: StepOutput  # timings and everything but the tokens
    states: list  # SeqState of each sampled row
    positions: list[int]  # where each state's placeholder sits in its token_ids
    device_tokens: torch.Tensor  # [num_sampled] int64 on the device
    host_tokens: torch.Tensor  # [num_sampled] int64, pinned on CUDA
    event: torch.cuda.Event | None  # recorded after the copy to the host (CUDA only)
    t_launched: int

    def done(self) -> bool:
        return self.event is None or self.event.query()


@dataclass(slots=True)
class SeqState:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_table: list[int]
    params: SamplingParams
    row: int = -1  # row in the runner's BlockTableRows
    # Entries of block_table already copied to the row; set to 0 after replacing entries in place.
    num_synced_blocks: int = 0
    grammar: SeqGrammar | None = None  # the output constraint's matcher (gpu_worker/grammar.py)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        model_config,
        device: torch.device,
        block_size: int,
        max_num_seqs: int = 256,
        use_cuda_graphs: bool = True,
        grammars: GrammarCache | None = None,
    ) -> None:
        if device.type == "cpu" and isinstance(model, torch.nn.Module):  # (unit tests pass stand-ins)
            pack_linears(model)  # oneDNN with prepacked weights: much faster than MKL at decode sizes
        self.model = model
        self.model_config = model_config
        self.device = device
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"
        self.kv: KVPool | None = None
        self.graphs: DecodeGraphs | None = None
        self.seqs: dict[int, SeqState] = {}
        self.rows = BlockTableRows(-(-model_config.max_model_len // block_size))
        self.staging = HostStaging(device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0)
        # min_tokens holds these back (unit tests' stand-in configs may have none).
        self.eos_token_ids = tuple(getattr(model_config, "eos_token_ids", ()) or ())
        self.grammars = grammars  # compiles output constraints; None: constrained sequences are refused

    def allocate_kv(self, num_blocks: int, dtype: torch.dtype, num_cpu_blocks: int = 0) -> None:
        cfg = self.model_config
        self.graphs = None
        self.kv = None  # drop the old pool (and the graphs over it) first: both at once may not fit
        self.kv = KVPool(
            cfg.num_layers, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim, dtype, self.device,
            num_cpu_blocks=num_cpu_blocks,
        )

    def capture_graphs(self) -> None:
        """Captures decode graphs over the allocated pool (CUDA only; call after allocate_kv)."""
        if not self.use_cuda_graphs or self.kv is None:
            return
        self.graphs = DecodeGraphs(
            self.model, self.kv.caches, self.device, self.max_num_seqs, self.rows.max_blocks,
            self.model_config.max_model_len, staging=self.staging,
        )
        self.graphs.capture()

    # ---- one step

    def execute(self, plan: StepPlan) -> StepOutput:
        """Launches and finishes one step."""
        step = self.launch(plan)
        return self.finish(step) if isinstance(step, PendingStep) else step

    def can_follow(self, plan: StepPlan, prev: PendingStep) -> bool:
        """Whether ``plan`` may be launched before ``prev`` is finished: every sequence that may sample
        is greedy without logprobs (so the step samples on the device too), a decode's input is known
        or is prev's token, prefill chunks and new sequences bring their tokens, and nothing reads or
        moves tokens or blocks on the host (forks, beam tokens, swaps, copies)."""
        if plan.forks or plan.last_tokens or plan.table_updates or plan.num_top_logprobs or plan.has_block_ops:
            return False
        seqs = self.seqs
        for seq_id in plan.running_seq_ids:
            state = seqs.get(seq_id)
            if state is None or not state.params.plain_greedy or _wants_prompt_logprobs(state):
                return False
            if state.grammar is not None:  # its mask needs prev's token on the host
                return False
        return all(n.params.plain_greedy and n.params.prompt_logprobs is None and n.params.constraint is None
                   for n in plan.new_seqs)

    @torch.inference_mode()
    def launch(self, plan: StepPlan, prev: PendingStep | None = None) -> PendingStep | StepOutput:
        """Applies the plan and starts the step on the device. Greedy steps without logprobs return a
        PendingStep (finish it for the result); the others run to the end and return their result.
        ``prev``: a step launched before and not finished, which ``can_follow(plan, prev)`` accepted."""
        t0 = time.perf_counter_ns()
        batch = self._apply_plan(plan)
        result = StepOutput(plan.step_id)
        if not batch:
            result.timings.total_ns = time.perf_counter_ns() - t0
            return result
        assert self.kv is not None, "step before InitCache"
        fixups = self._fixups(batch, prev)
        prompt_rows = prompt_logprob_rows(batch)  # before build_inputs advances num_computed_tokens
        inputs = build_inputs(batch, self.rows, self.block_size)
        t1 = time.perf_counter_ns()
        prompt_logits = None
        if prompt_rows:
            logits, prompt_logits = self._forward_eager(inputs, fixups, prompt_rows.indices)
        elif self.graphs is not None and self.graphs.fits(inputs):
            logits = self.graphs.run(inputs, fixups)
            if len(inputs.logits_indices) != inputs.num_seqs:
                (logits_indices,) = self.staging.to_device(inputs.logits_indices)
                logits = logits[logits_indices]
        else:
            logits = self._forward_eager(inputs, fixups)
        t2 = time.perf_counter_ns()
        states = inputs.sample_states
        masks = token_masks(states, logits.shape[-1], self.model_config.eos_token_ids)
        if masks is not None:
            logits = apply_masks(logits, *masks)
        want_logprobs = plan.num_top_logprobs > 0 or any(s.params.logprobs for s in states)
        result.timings.prepare_ns = t1 - t0
        result.timings.forward_ns = t2 - t1
        if prompt_logits is not None:
            prompt_rows.add_to(result, prompt_logits)
            if not states:  # prefill chunks only: nothing to sample
                result.timings.total_ns = time.perf_counter_ns() - t0
                return result
        if not want_logprobs and all(s.params.plain_greedy for s in states) and not prompt_rows:
            # the common fast path
            device_tokens = logits.argmax(dim=-1)
            on_cuda = device_tokens.is_cuda
            host_tokens = torch.empty(device_tokens.shape, dtype=torch.int64, pin_memory=on_cuda)
            host_tokens.copy_(device_tokens, non_blocking=on_cuda)
            event = None
            if on_cuda:
                event = torch.cuda.Event()
                event.record()
            positions = []
            for state in states:
                positions.append(len(state.token_ids))
                state.token_ids.append(PLACEHOLDER)
            return PendingStep(result, states, positions, device_tokens, host_tokens, event, t0)
        if prev is not None:
            raise RuntimeError("a step that samples on the host cannot follow an unfinished step")
        self._sample_into(result, logits, states, plan.num_top_logprobs, want_logprobs)
        t3 = time.perf_counter_ns()
        result.timings.sample_ns = t3 - t2
        result.timings.total_ns = time.perf_counter_ns() - t0
        return result

    def finish(self, step: PendingStep) -> StepOutput:
        """Waits for the step's tokens (its own event only: later launches keep running), puts them in
        place of the placeholders and returns the result."""
        t = time.perf_counter_ns()
        if step.event is not None:
            step.event.synchronize()
        tokens = step.host_tokens.tolist()
        for state, position, token in zip(step.states, step.positions, tokens, strict=True):
            state.token_ids[position] = token
        result = step.result
        result.seq_ids.extend([s.seq_id for s in step.states])
        result.sampled_token_ids.extend(tokens)
        now = time.perf_counter_ns()
        result.timings.sample_ns = now - t
        result.timings.total_ns = now - step.t_launched
        return result

    def _fixups(self, batch: list, prev: PendingStep | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows of this step's input_ids, rows of prev's device tokens) for inputs that are prev's
        placeholders; None when there are none."""
        if prev is None:
            return None
        where = {id(state): j for j, state in enumerate(prev.states)}
        rows, sources = [], []
        t = 0
        for state, n in batch:
            if state.token_ids[state.num_computed_tokens] == PLACEHOLDER:
                if n != 1:
                    raise RuntimeError(f"sequence {state.seq_id}: a placeholder inside a prefill chunk")
                rows.append(t)
                sources.append(where[id(state)])
            t += n
        if not rows:
            return None
        rows_d, sources_d = self.staging.to_device(np.asarray(rows, dtype=np.int64),
                                                   np.asarray(sources, dtype=np.int64))
        return rows_d, prev.device_tokens[sources_d]

    def _forward_eager(self, inputs: StepInputs, fixups=None, prompt_indices: list[int] | None = None):
        """The sampling rows' logits; with ``prompt_indices`` (flattened token indices) also theirs, as
        (logits, prompt_logits)."""
        slot_mapping, block_tables, seq_lens, query_start_loc, input_ids, positions, logits_indices = (
            self.staging.to_device(inputs.slot_mapping, inputs.block_tables, inputs.seq_lens,
                                   inputs.query_start_loc, inputs.input_ids, inputs.positions,
                                   inputs.logits_indices))
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens,
            query_start_loc=query_start_loc,
            max_query_len=inputs.max_query_len,
            max_seq_len=inputs.max_seq_len,
        )
        if fixups is not None:
            input_ids[fixups[0]] = fixups[1]
        hidden = self.model(input_ids, positions, self.kv.caches, meta)
        if prompt_indices is None:
            return self.model.compute_logits(hidden[logits_indices])
        extra = torch.tensor(prompt_indices, device=hidden.device, dtype=torch.long)
        logits = self.model.compute_logits(torch.cat([hidden[logits_indices], hidden[extra]]))
        num_sampled = len(inputs.logits_indices)
        return logits[:num_sampled], logits[num_sampled:]

    def _apply_plan(self, plan: StepPlan) -> list[tuple[SeqState, int]]:
        """Updates per-sequence state from the plan and runs its block operations; returns
        (state, num_scheduled_tokens) in batch order.

        Order: drop finished sequences, forks, last-token replacements, swap-out, swap-in, copies,
        new sequences, table updates, then the running sequences' new blocks."""
        for seq_id in plan.finished_seq_ids:
            self._drop(seq_id)
        for fork in plan.forks:
            self._fork(fork)
        for seq_id, token_id in plan.last_tokens:
            self.seqs[seq_id].token_ids[-1] = token_id
        self._run_block_ops(plan)
        batch = []
        for new in plan.new_seqs:
            self._drop(new.seq_id)
            state = SeqState(new.seq_id, new.token_ids, new.num_prompt_tokens, new.num_computed_tokens,
                             new.block_ids, new.params, row=self.rows.acquire())
            if state.params.constraint is not None:
                state.grammar = SeqGrammar(self._grammar_cache().get(state.params.constraint))
            self.seqs[new.seq_id] = state
            batch.append((state, new.num_scheduled_tokens))
        for update in plan.table_updates:
            state = self.seqs[update.seq_id]
            for position, block_id in zip(update.positions, update.block_ids, strict=True):
                state.block_table[position] = block_id
            state.num_synced_blocks = 0  # entries changed in place: rewrite the row
        offset = 0
        new_block_ids = plan.running_new_block_ids
        for seq_id, num_tokens, num_new_blocks in zip(
            plan.running_seq_ids, plan.running_num_scheduled_tokens, plan.running_num_new_blocks, strict=True
        ):
            state = self.seqs[seq_id]
            if num_new_blocks:
                state.block_table.extend(new_block_ids[offset : offset + num_new_blocks])
                offset += num_new_blocks
            batch.append((state, num_tokens))
        return batch

    def _fork(self, fork: Fork) -> None:
        """The child starts as a copy of the parent: same tokens, same block table (shared blocks)."""
        child = copy.copy(self.seqs[fork.parent_seq_id])
        child.seq_id = fork.child_seq_id
        child.token_ids = list(child.token_ids)
        child.block_table = list(child.block_table)
        child.row = self.rows.acquire()
        child.num_synced_blocks = 0
        if fork.token_id is not None:
            child.token_ids[-1] = fork.token_id
        if fork.params is not None:
            child.params = fork.params
        if child.grammar is not None:
            child.grammar = child.grammar.fork()
        self._drop(child.seq_id)
        self.seqs[child.seq_id] = child

    def _run_block_ops(self, plan: StepPlan) -> None:
        """Swaps and copy-on-write copies, before anything reads or writes the blocks this step."""
        if not plan.has_block_ops:
            return
        assert self.kv is not None, "block operations before InitCache"
        self.kv.swap_out(*plan.swap_out)
        self.kv.swap_in(*plan.swap_in)
        self.kv.copy(*plan.copies)

    def _grammar_cache(self) -> GrammarCache:
        if self.grammars is None:
            raise RuntimeError("this runner has no grammar cache: output constraints are not supported")
        return self.grammars

    def _drop(self, seq_id: int) -> None:
        state = self.seqs.pop(seq_id, None)
        if state is not None:
            self.rows.release(state.row)

    def _sample_request(self, state: SeqState) -> SampleRequest:
        return SampleRequest(state.params, len(state.token_ids) - state.num_prompt_tokens, state.token_ids)

    def _sample_into(self, result: StepOutput, logits: torch.Tensor, states: list[SeqState], num_top: int,
                     want_logprobs: bool) -> None:
        """Samples every row on the host path and appends the tokens to the states and ``result``. When
        the batch raises, each row is sampled alone: a row that still raises is its sequence's own
        failure (``result.seq_errors``; its state gets token 0 so a step planned ahead still lines up,
        and the scheduler drops it), and the other rows keep their tokens."""
        def run(rows: torch.Tensor, batch: list[SeqState]) -> SampleResult:
            return sample(rows, [self._sample_request(s) for s in batch], num_top, self.generator,
                          want_logprobs=want_logprobs, eos_token_ids=self.eos_token_ids)

        try:
            whole = run(logits, states)
            picks = [(state, whole, j) for j, state in enumerate(states)]
        except Exception as batch_exc:  # noqa: BLE001 - isolated below, row by row
            picks = []
            for j, state in enumerate(states):
                try:
                    picks.append((state, run(logits[j : j + 1], [state]), 0))
                except Exception as exc:  # noqa: BLE001 - this sequence's failure, reported in-band
                    result.seq_errors[state.seq_id] = log.describe_exception(exc)
                    state.token_ids.append(0)
                    _logger.error("sampling failed for one sequence", seq_id=state.seq_id, step_id=result.step_id,
                                  error=log.describe_exception(exc), exc_info=exc)
            if not result.seq_errors:  # every row sampled alone: the batch's failure was not one row's
                raise batch_exc
        for state, sampled, j in picks:
            token = sampled.token_ids[j]
            state.token_ids.append(token)
            result.seq_ids.append(state.seq_id)
            result.sampled_token_ids.append(token)
            if sampled.logprobs:
                result.sampled_logprobs.append(sampled.logprobs[j])
            if sampled.top_token_ids:
                result.top_logprobs.append((sampled.top_token_ids[j], sampled.top_logprobs[j]))


def _wants_prompt_logprobs(state: SeqState) -> bool:
    """Whether the sequence still has prompt positions whose logprobs it asked for to compute."""
    return state.params.prompt_logprobs is not None and state.num_computed_tokens < state.num_prompt_tokens - 1
