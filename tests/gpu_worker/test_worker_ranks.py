"""The worker's rank settings: a step error stays in-band with one rank and is fatal with several (the
peers may wait in a collective), ranks are validated, the rendezvous flag reaches the config, and the
step profiler puts NCCL kernels in a category of their own."""

import pytest

import clients  # noqa: F401
from gpu_worker.step_profile import categorize
from gpu_worker.worker import RankFailed, Worker, WorkerConfig, build_parser, config_from_args


def _bare_worker(**config) -> Worker:
    """A Worker with a config and nothing loaded: enough for _step_error."""
    worker = Worker.__new__(Worker)
    worker.config = WorkerConfig(model="m", scheduler_address="ipc:///tmp/x/w.sock", **config)
    return worker


def test_a_step_error_is_in_band_with_one_rank_and_fatal_with_several():
    reply = _bare_worker()._step_error(7, ValueError("boom"))
    assert reply.step_result.step_id == 7 and reply.step_result.error == "ValueError: boom"
    with pytest.raises(RankFailed, match="rank 1, step 7: ValueError: boom"):
        _bare_worker(rank=1, world_size=2)._step_error(7, ValueError("boom"))


def test_ranks_are_validated():
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        WorkerConfig(model="m", scheduler_address="x", rank=2, world_size=2)


def test_dist_init_method_flag():
    args = build_parser().parse_args(["--model", "m", "--scheduler", "tcp://h:1", "--rank", "1", "--world-size", "2",
                                      "--dist-init-method", "tcp://h:9"])
    config = config_from_args(args)
    assert (config.rank, config.world_size, config.dist_init_method) == (1, 2, "tcp://h:9")
    assert config_from_args(build_parser().parse_args(["--model", "m", "--scheduler", "x"])).dist_init_method is None


def test_the_step_profiler_counts_nccl_kernels_as_collectives():
    for name in ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
                 "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)"):
        assert categorize(name) == "collectives"  # not "sampling" (reduce) nor "elementwise" (gather)
