import torch

import clients  # noqa: F401
from gpu_worker.engine_args import parse_bytes
from gpu_worker.worker import Worker, WorkerConfig
from pagedserve.internal.v1 import worker_pb2
from tests.factories import make_checkpoint


def test_parse_bytes():
    assert parse_bytes("64MiB") == 64 * 2**20
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1000") == 1000


def test_profile_step_splits_the_largest_step_by_context_length(tmp_path):
    path = make_checkpoint(tmp_path / "m", max_position_embeddings=128)
    worker = Worker(WorkerConfig(model=str(path), scheduler_address="inproc://x", max_num_batched_tokens=300,
                                 block_size=16, kv_cache_memory=2**20))
    # 300 tokens -> sequences of 128, 128 and 44 tokens: 8 + 8 + 3 blocks
    assert worker.profile_step() == 19
    assert worker.runner.kv is None and not worker.runner.seqs


def test_hello_reports_blocks_that_fit_the_cpu_budget(tmp_path):
    path = make_checkpoint(tmp_path / "m")
    worker = Worker(WorkerConfig(model=str(path), scheduler_address="inproc://x", kv_cache_memory=2**20))
    per_block = 16 * worker.model_config.kv_bytes_per_token(torch.float32)
    hello = worker.hello().hello
    assert hello.num_blocks == 2**20 // per_block and hello.block_size == 16
    cmd = worker_pb2.WorkerCommand()
    cmd.init_cache.num_blocks = 4
    reply = worker.handle(cmd)
    assert reply.cache_ready.num_blocks == 4 and worker.runner.kv.num_blocks == 4


def test_max_num_blocks_caps_what_the_hello_reports(tmp_path):
    path = make_checkpoint(tmp_path / "m")
    worker = Worker(WorkerConfig(model=str(path), scheduler_address="inproc://x", kv_cache_memory=2**20,
                                 max_num_blocks=3))
    assert worker.hello().hello.num_blocks == 3


def _sampling_step(step_id: int, seeds: list[int]) -> worker_pb2.WorkerCommand:
    """A step starting one sampled sequence per seed (ids 1..), each with a prompt of 3 tokens."""
    cmd = worker_pb2.WorkerCommand()
    cmd.step.step_id = step_id
    for i, seed in enumerate(seeds):
        new = cmd.step.new_seqs.add(seq_id=i + 1, token_ids=[5, 6, 7], num_prompt_tokens=3, num_scheduled_tokens=3,
                                    block_ids=[i])
        new.sampling_params.max_tokens = 4
        new.sampling_params.temperature = 1.0
        new.sampling_params.seed = seed
        new.sampling_params.has_seed = True
    return cmd


def _decode_step(step_id: int, seq_ids: list[int]) -> worker_pb2.WorkerCommand:
    cmd = worker_pb2.WorkerCommand()
    cmd.step.step_id = step_id
    cmd.step.running_seq_ids.extend(seq_ids)
    cmd.step.running_num_scheduled_tokens.extend([1] * len(seq_ids))
    cmd.step.running_num_new_blocks.extend([0] * len(seq_ids))
    return cmd


def _ready_worker(tmp_path) -> Worker:
    worker = Worker(WorkerConfig(model=str(make_checkpoint(tmp_path / "m")), scheduler_address="inproc://x",
                                 kv_cache_memory=2**20))
    cmd = worker_pb2.WorkerCommand()
    cmd.init_cache.num_blocks = 8
    worker.handle(cmd)
    return worker


def test_a_row_whose_sampling_raises_fails_that_sequence_alone(tmp_path, monkeypatch):
    import gpu_worker.model_runner as runner_module

    real_sample = runner_module.sample

    def sample(logits, rows, *args, **kwargs):  # a sampler bug that one sequence's data triggers
        if any(r.params.seed == 13 for r in rows):
            raise ValueError("seed 13 cannot be sampled")
        return real_sample(logits, rows, *args, **kwargs)

    monkeypatch.setattr(runner_module, "sample", sample)
    worker = _ready_worker(tmp_path)
    first = worker.handle(_sampling_step(0, [1, 13, 2])).step_result
    assert first.error == "" and list(first.seq_ids) == [1, 3]
    assert [(e.seq_id, e.error) for e in first.seq_errors] == [(2, "ValueError: seed 13 cannot be sampled")]
    # The same tokens as a batch without the failing row: isolation does not change the others' samples.
    alone = _ready_worker(tmp_path / "b").handle(_sampling_step(0, [1, 7, 2])).step_result
    assert [first.sampled_token_ids[0], first.sampled_token_ids[1]] == [alone.sampled_token_ids[0],
                                                                         alone.sampled_token_ids[2]]
    # A step planned ahead still runs the failed sequence (the scheduler drops it later) and fails it
    # alone again; the others decode on.
    second = worker.handle(_decode_step(1, [1, 2, 3])).step_result
    assert second.error == "" and list(second.seq_ids) == [1, 3] and [e.seq_id for e in second.seq_errors] == [2]


def test_a_batch_failure_that_no_row_explains_fails_the_step(tmp_path, monkeypatch):
    import gpu_worker.model_runner as runner_module

    real_sample = runner_module.sample

    def sample(logits, rows, *args, **kwargs):  # fails for batches only: not one sequence's fault
        if len(rows) > 1:
            raise RuntimeError("device fault")
        return real_sample(logits, rows, *args, **kwargs)

    monkeypatch.setattr(runner_module, "sample", sample)
    result = _ready_worker(tmp_path).handle(_sampling_step(0, [1, 2])).step_result
    assert result.error == "RuntimeError: device fault" and not result.seq_ids and not result.seq_errors
