"""Small builders shared by the scheduler tests."""

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.scheduler import Scheduler, SchedulerOutput


def params(max_tokens=4, **kw) -> scheduler_pb2.SamplingParams:
    return scheduler_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, **kw)


def scheduler(num_blocks=16, block_size=4, max_num_seqs=8, budget=64, max_model_len=128, eos=(99,),
              watermark=0.0) -> Scheduler:
    config = SchedulerConfig(block_size=block_size, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=budget, watermark=watermark)
    return Scheduler(config, num_blocks, max_model_len, list(eos), vocab_size=100)


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
    """Every block is free xor referenced, and ref counts equal the references block tables hold."""
    held: dict[int, int] = {}
    for table in sched.kv.block_tables.values():
        for block in table:
            held[block.block_id] = held.get(block.block_id, 0) + 1
    free = set(sched.pool.free_queue.block_ids())
    assert len(free) == sched.pool.num_free_blocks
    for block in sched.pool.blocks:
        assert block.ref_cnt == held.get(block.block_id, 0), block
        assert (block.block_id in free) != (block.ref_cnt > 0), block
    running_ids = {s.seq_id for s in sched.running}
    assert set(sched.kv.block_tables) == running_ids
    for seq in sched.running:
        assert len(sched.kv.block_tables[seq.seq_id]) * sched.block_size >= seq.num_computed_tokens
