"""Small builders shared by the scheduler tests, and a worker stand-in that runs the real plan
application (gpu_worker.model_runner) over a KV pool that stores token ids instead of K and V."""

import math
import random
from types import SimpleNamespace

import torch

import clients  # noqa: F401
from gpu_worker.model_runner import ModelRunner
from gpu_worker.sampling_params import SamplingParams
from gpu_worker.step_io import decode_plan
from pagedserve.internal.v1 import worker_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.request import SeqStatus
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.step_plan import SchedulerOutput, decode_result, encode_step

TOY_VOCAB = 100


def params(max_tokens=4, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def scheduler(num_blocks=16, block_size=4, max_num_seqs=8, budget=64, max_model_len=128, eos=(99,),
              watermark=0.0, num_cpu_blocks=0, prefix_caching=True, prefill_cap=0) -> Scheduler:
    config = SchedulerConfig(block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             watermark=watermark, enable_prefix_caching=prefix_caching,
                             max_prefill_tokens_with_decodes=prefill_cap)
    return Scheduler(config, num_blocks, max_model_len, list(eos), vocab_size=100, num_cpu_blocks=num_cpu_blocks)


def sampled_for(out: SchedulerOutput, token=5) -> dict[int, int]:
    """What a worker would return: a token for every sequence whose step reaches its end."""
    return {
        s.seq.seq_id: token
        for s in out.new_seqs + out.running
        if s.seq.num_computed_tokens + s.num_scheduled_tokens == s.seq.num_tokens
    }


def step(sched: Scheduler, token=5):
    out = sched.schedule()
    return out, sched.update(out, sampled_for(out, token))


def check_invariants(sched: Scheduler) -> None:
    """Every block is free xor referenced, and ref counts equal the references block tables hold (device
    and CPU pools separately); cached hashes are consistent and only on fully computed blocks; the
    queues agree with the sequences' states and the requests they belong to."""
    sched.kv.check_invariants(sched.running, sched.swapped)
    for seq in sched.running:
        assert seq.status is SeqStatus.RUNNING
    for seq in sched.waiting:
        assert seq.status is SeqStatus.WAITING and seq.num_computed_tokens == 0
    for seq in sched.swapped:
        assert seq.status is SeqStatus.SWAPPED
    for seq in [*sched.running, *sched.waiting, *sched.swapped]:
        r = seq.request
        assert sched.requests[(r.stream_id, r.request_id)] is r and seq in r.seqs


def toy_logprobs(token_ids: list[int]) -> list[float]:
    """A deterministic toy language model over TOY_VOCAB tokens: next-token log probabilities from the
    last three tokens."""
    rng = random.Random(hash(tuple(token_ids[-3:])))
    logits = [rng.gauss(0.0, 2.0) for _ in range(TOY_VOCAB)]
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - norm for x in logits]


class ToyWorker:
    """The real ModelRunner._apply_plan (forks, last tokens, swaps, copies, table updates) over a KV
    pool of one layer, one head, head_dim 1, whose slots hold the token id written there. A step writes
    each computed token into its slot and samples from toy_logprobs (greedy), with top candidates."""

    def __init__(self, sched: Scheduler, num_top: int | None = None) -> None:
        cfg = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=1, max_model_len=sched.max_model_len)
        self.runner = ModelRunner(None, cfg, torch.device("cpu"), sched.block_size, use_cuda_graphs=False)
        num_cpu = sched.cpu_pool.num_blocks if sched.cpu_pool is not None else 0
        self.runner.allocate_kv(sched.pool.num_blocks, torch.float32, num_cpu_blocks=num_cpu)
        self.runner.kv.caches[0][0].fill_(-1.0)
        self.block_size = sched.block_size
        self.num_copies = 0
        self.num_swapped_blocks = 0

    @property
    def slots(self):
        return self.runner.kv.caches[0][0].numpy()  # [num_blocks, block_size, 1, 1], shares memory

    def run(self, out: SchedulerOutput, sched: Scheduler | None = None):
        """Executes the step (checking the workers' state against ``sched`` once the plan is applied);
        returns (sampled, top) as the scheduler's update takes them."""
        plan = worker_pb2.WorkerCommand.FromString(encode_step(out)).step
        self.num_copies += len(plan.copy_src_block_ids)
        self.num_swapped_blocks += len(plan.swap_out_src_block_ids)
        batch = self.runner._apply_plan(decode_plan(plan))
        if sched is not None:
            self.check(sched)
        result = worker_pb2.StepResult(step_id=plan.step_id)
        slots, bs = self.slots, self.block_size
        for state, n in batch:
            start = state.num_computed_tokens
            for p in range(start, start + n):
                slots[state.block_table[p // bs], p % bs, 0, 0] = state.token_ids[p]
            state.num_computed_tokens = start + n
            if state.num_computed_tokens == len(state.token_ids):
                lps = toy_logprobs(state.token_ids)
                order = sorted(range(TOY_VOCAB), key=lambda t: -lps[t])
                result.seq_ids.append(state.seq_id)
                result.sampled_token_ids.append(order[0])
                result.sampled_logprobs.append(lps[order[0]])
                k = plan.num_top_logprobs
                result.top_logprobs.add(token_ids=order[:k], logprobs=[lps[t] for t in order[:k]])
                state.token_ids.append(order[0])
        decoded = decode_result(result)
        return decoded.sampled, decoded.top

    def check(self, sched: Scheduler) -> None:
        """After a plan is applied: the workers hold exactly the running sequences, with the scheduler's
        tokens and tables, and every computed slot holds its token (forks, copies, swaps and prefix
        hits moved the right data)."""
        seqs = self.runner.seqs
        assert set(seqs) == {s.seq_id for s in sched.running}
        slots, bs = self.slots, self.block_size
        for seq in sched.running:
            state = seqs[seq.seq_id]
            assert state.token_ids == seq.token_ids
            assert state.num_computed_tokens == seq.num_computed_tokens
            assert state.block_table == sched.kv.block_table(seq.seq_id)
            stored = [slots[state.block_table[p // bs], p % bs, 0, 0] for p in range(seq.num_computed_tokens)]
            assert stored == seq.token_ids[: seq.num_computed_tokens], seq.seq_id


def run_step(sched: Scheduler, worker: ToyWorker):
    out = sched.schedule()
    sampled, top = worker.run(out, sched)
    return out, sched.update(out, sampled, top=top)
