"""The engine's statistics (EngineInfo.stats, what ``pagedserve`` metrics and the benchmarks read):
plain counters while the engine runs, one EngineStats proto built here when someone asks.

The scheduler keeps its own counters (SchedulerStats); the engine loop adds where step time goes
(StepTimes); ``engine_stats`` joins them with the current queue and pool sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2, worker_pb2

if TYPE_CHECKING:
    from scheduler_svc.scheduler import Scheduler


@dataclass(slots=True)
class StepTimes:
    """Where step time goes, accumulated over the engine's life (nanoseconds)."""

    step_wall_ns: int = 0  # the engine's wall time per step, planning to results applied
    worker_total_ns: int = 0  # rank 0's own timings, summed
    worker_forward_ns: int = 0
    worker_sample_ns: int = 0
    worker_prepare_ns: int = 0
    num_decode_steps: int = 0  # steps that only decode (one token per running sequence)
    decode_step_wall_ns: int = 0

    def add(self, out, timings: worker_pb2.StepTimings, wall_ns: int) -> None:
        """One step: ``out`` the SchedulerOutput that was run, ``timings`` the worker's."""
        self.step_wall_ns += wall_ns
        self.worker_total_ns += timings.total_ns
        self.worker_forward_ns += timings.forward_ns
        self.worker_sample_ns += timings.sample_ns
        self.worker_prepare_ns += timings.prepare_ns
        if not out.new_seqs and out.running and all(s.num_scheduled_tokens == 1 for s in out.running):
            self.num_decode_steps += 1
            self.decode_step_wall_ns += wall_ns


def engine_stats(scheduler: Scheduler, times: StepTimes) -> scheduler_pb2.EngineStats:
    """The proto (the process edge): the scheduler's counters, the step times and a snapshot of the
    queues and the block pool."""
    s = scheduler
    return scheduler_pb2.EngineStats(
        **asdict(s.stats),
        **asdict(times),
        num_free_blocks=s.pool.num_free_blocks,
        num_running=len(s.running),
        num_waiting=len(s.waiting),
        num_requests=len(s.requests),
        num_swapped=len(s.swapped),
        num_evictions=s.pool.num_evictions,
    )
