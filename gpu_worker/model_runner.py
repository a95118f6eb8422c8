"""Runs one StepPlan: applies its deltas to the persistent per-sequence state, builds the flattened
varlen batch, runs the model over the paged KV pool and samples.

The scheduler decides which blocks hold what; the runner only follows the plan. A sequence samples a
token in a step exactly when the step's tokens reach the end of its known tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import clients  # noqa: F401
from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.kv_pool import KVPool
from gpu_worker.sampler import SampleRequest, sample
from pagedserve.internal.v1 import scheduler_pb2, worker_pb2


@dataclass(slots=True)
class SeqState:
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_table: list[int]
    params: scheduler_pb2.SamplingParams


class ModelRunner:
    def __init__(self, model: torch.nn.Module, model_config, device: torch.device, block_size: int) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.block_size = block_size
        self.kv: KVPool | None = None
        self.seqs: dict[int, SeqState] = {}
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0)

    def allocate_kv(self, num_blocks: int, dtype: torch.dtype) -> None:
        cfg = self.model_config
        self.kv = KVPool(
            cfg.num_layers, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim, dtype, self.device
        )

    # ---- one step

    @torch.inference_mode()
    def execute(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        t0 = time.perf_counter_ns()
        batch = self._apply_plan(plan)
        result = worker_pb2.StepResult(step_id=plan.step_id)
        if not batch:
            result.timings.total_ns = time.perf_counter_ns() - t0
            return result
        input_ids, positions, meta, sample_rows = self._prepare(batch)
        t1 = time.perf_counter_ns()
        assert self.kv is not None, "step before InitCache"
        hidden = self.model(input_ids, positions, self.kv.caches, meta)
        logits_index = torch.tensor([i for i, _ in sample_rows], device=self.device, dtype=torch.long)
        logits = self.model.compute_logits(hidden[logits_index])
        t2 = time.perf_counter_ns()
        requests = [self._sample_request(state) for _, state in sample_rows]
        sampled = sample(logits, requests, plan.num_top_logprobs, self.generator)
        for (_, state), token in zip(sample_rows, sampled.token_ids, strict=True):
            state.token_ids.append(token)
        t3 = time.perf_counter_ns()
        result.seq_ids.extend([state.seq_id for _, state in sample_rows])
        result.sampled_token_ids.extend(sampled.token_ids)
        result.sampled_logprobs.extend(sampled.logprobs)
        for ids, lps in zip(sampled.top_token_ids, sampled.top_logprobs, strict=True):
            result.top_logprobs.add(token_ids=ids, logprobs=lps)
        result.timings.prepare_ns = t1 - t0
        result.timings.forward_ns = t2 - t1
        result.timings.sample_ns = t3 - t2
        result.timings.total_ns = time.perf_counter_ns() - t0
        return result

    def _apply_plan(self, plan: worker_pb2.StepPlan) -> list[tuple[SeqState, int]]:
        """Updates per-sequence state from the plan; returns (state, num_scheduled_tokens) in batch order."""
        for seq_id in plan.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        batch = []
        for new in plan.new_seqs:
            state = SeqState(
                new.seq_id,
                list(new.token_ids),
                new.num_prompt_tokens,
                new.num_computed_tokens,
                list(new.block_ids),
                new.sampling_params,
            )
            self.seqs[new.seq_id] = state
            batch.append((state, new.num_scheduled_tokens))
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

    def _prepare(self, batch: list[tuple[SeqState, int]]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start = [0]
        sample_rows: list[tuple[int, SeqState]] = []  # (index into the flat batch, state)
        max_blocks = 0
        for state, num_tokens in batch:
            start = state.num_computed_tokens
            end = start + num_tokens
            if end > len(state.token_ids):
                raise ValueError(f"sequence {state.seq_id}: step reaches token {end} of {len(state.token_ids)}")
            if (end + bs - 1) // bs > len(state.block_table):
                raise ValueError(f"sequence {state.seq_id}: {end} tokens but {len(state.block_table)} blocks")
            input_ids += state.token_ids[start:end]
            positions += range(start, end)
            table = state.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            seq_lens.append(end)
            query_start.append(query_start[-1] + num_tokens)
            max_blocks = max(max_blocks, len(table))
            state.num_computed_tokens = end
            if end == len(state.token_ids):
                sample_rows.append((query_start[-1] - 1, state))
        tables = [state.block_table + [0] * (max_blocks - len(state.block_table)) for state, _ in batch]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            max_query_len=max(n for _, n in batch),
            max_seq_len=max(seq_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta, sample_rows

    def _sample_request(self, state: SeqState) -> SampleRequest:
        p = state.params
        return SampleRequest(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p if p.top_p > 0 else 1.0,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty > 0 else 1.0,
            seed=p.seed if p.has_seed else None,
            output_index=len(state.token_ids) - state.num_prompt_tokens,
            token_ids=state.token_ids,
        )
