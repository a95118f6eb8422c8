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
