"""The KV pool's block operations (copy-on-write copies, swap-out, swap-in) and the worker's swap space."""

import torch

import clients  # noqa: F401
from gpu_worker.kv_pool import KVPool
from gpu_worker.worker import Worker, WorkerConfig, build_parser, config_from_args
from pagedserve.internal.v1 import worker_pb2
from tests.factories import make_checkpoint


def filled_pool() -> KVPool:
    pool = KVPool(2, 6, 4, 2, 3, torch.float32, torch.device("cpu"), num_cpu_blocks=3)
    for layer, (k, v) in enumerate(pool.caches):
        k.copy_(torch.arange(k.numel(), dtype=torch.float32).view_as(k) + 1000 * layer)
        v.copy_(-k)
    return pool


def test_copy_then_swap_out_and_in_move_whole_blocks_in_every_layer():
    pool = filled_pool()
    before = [(k.clone(), v.clone()) for k, v in pool.caches]
    pool.copy([1, 4], [2, 5])
    for (k, v), (k0, v0) in zip(pool.caches, before, strict=True):
        assert torch.equal(k[2], k0[1]) and torch.equal(v[5], v0[4]) and torch.equal(k[0], k0[0])
    pool.swap_out([0, 2], [2, 0])
    for (k, v), (ck, cv) in zip(pool.caches, pool.cpu_caches, strict=True):
        assert torch.equal(ck[2], k[0]) and torch.equal(cv[0], v[2])
    saved = [(ck.clone(), cv.clone()) for ck, cv in pool.cpu_caches]
    for k, v in pool.caches:
        k.zero_()
        v.zero_()
    pool.swap_in([0, 2], [3, 1])
    for (k, v), (ck, cv) in zip(pool.caches, saved, strict=True):
        assert torch.equal(k[3], ck[0]) and torch.equal(v[1], cv[2]) and not k[0].any()


def test_worker_reports_and_allocates_its_swap_space(tmp_path):
    path = make_checkpoint(tmp_path / "m")
    args = build_parser().parse_args(["--model", str(path), "--scheduler", "inproc://x", "--swap-space", "0.001",
                                      "--kv-cache-memory", "1MiB"])
    config = config_from_args(args)
    assert config.swap_space == int(0.001 * 2**30)
    worker = Worker(config)
    per_block = 16 * worker.model_config.kv_bytes_per_token(torch.float32)
    assert worker.hello().hello.num_cpu_blocks == config.swap_space // per_block
    cmd = worker_pb2.WorkerCommand()
    cmd.init_cache.num_blocks, cmd.init_cache.num_cpu_blocks = 4, 3
    reply = worker.handle(cmd)
    assert reply.cache_ready.num_cpu_blocks == 3 and worker.runner.kv.cpu_caches[0][0].shape[0] == 3
    assert WorkerConfig(model="m", scheduler_address="x").swap_space == 4 * 2**30
