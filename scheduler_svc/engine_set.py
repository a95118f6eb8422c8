"""The engines of ``pagedserve serve --engines N``: each one a scheduler and its worker ranks, on a unix
socket and an ipc socket of its own, named engine0 .. engineN-1 (the engine label of the metrics).

With one engine, any child that exits stops the service (never a half-alive service). With several, an
engine that dies after it has been ready once is a lost replica, not a broken service: its remaining
processes are stopped and it is started again after a pause (1 s, doubling up to 30 s while it keeps
dying before it is ready again), while the gateways route around it. An engine that dies before it was
ever ready (a bad model, a bad flag) still stops the service.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from scheduler_svc.kv_events import engine_endpoint
from scheduler_svc.launcher import Child, ProcessGroup, engine_commands

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
PROBE_INTERVAL_S = 0.5


class _ReadyProbe:
    """Asks a scheduler's GetEngineInfo whether its workers are ready (grpc imported only when used)."""

    def __init__(self, address: str) -> None:
        import grpc

        import clients  # noqa: F401
        from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc

        self._grpc, self._pb2 = grpc, scheduler_pb2
        self._channel = grpc.insecure_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerServiceStub(self._channel)

    def ready(self) -> bool:
        try:
            return self._stub.GetEngineInfo(self._pb2.GetEngineInfoRequest(), timeout=1.0).ready
        except self._grpc.RpcError:
            return False

    def close(self) -> None:
        self._channel.close()


@dataclass(eq=False)
class EngineProcs:
    """One engine's processes and what the launcher knows about them."""

    name: str
    scheduler_address: str
    worker_address: str
    commands: list[tuple[str, list[str]]]
    children: list[Child] = field(default_factory=list)
    ever_ready: bool = False
    ready: bool = False
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None  # set while it waits to be started again
    next_probe: float = 0.0


class EngineSet:
    def __init__(self, engine: EngineArgs, num_engines: int, tmp: Path, model_name: str,
                 metrics_dir: Path | None = None) -> None:
        if num_engines < 1:
            raise ValueError("--engines must be at least 1")
        if num_engines > 1 and engine.device.startswith("cuda:"):
            raise ValueError("--engines: give --device cuda (engine i takes the GPUs from i * tensor-parallel size)")
        self.metrics_dir = metrics_dir
        self.engines: list[EngineProcs] = []
        for i in range(num_engines):
            single = num_engines == 1
            sched = f"unix://{tmp}/{'scheduler' if single else f'engine{i}'}.sock"
            workers = f"ipc://{tmp}/{'workers' if single else f'engine{i}-workers'}.sock"
            extra = ["--engine-name", f"engine{i}", "--model-name", model_name]
            own = engine if single or not engine.kv_events_endpoint else replace(
                engine, kv_events_endpoint=engine_endpoint(engine.kv_events_endpoint, i))
            commands = engine_commands(own, sched, workers, None if single else i, extra)
            self.engines.append(EngineProcs(f"engine{i}", sched, workers, commands))
        self._probes: dict[str, _ReadyProbe] = {}

    @property
    def scheduler_addresses(self) -> list[str]:
        return [e.scheduler_address for e in self.engines]

    def start(self, group: ProcessGroup, engine: EngineProcs | None = None) -> list[str]:
        """Starts every engine (or one); returns 'NAME (pid N)' per process."""
        started = []
        for e in [engine] if engine is not None else self.engines:
            e.children = [group.start(name, command) for name, command in e.commands]
            e.ready, e.restart_at, e.next_probe = False, None, 0.0
            started += [f"{c.name} (pid {c.popen.pid})" for c in e.children]
        return started

    def owner(self, child: Child) -> EngineProcs | None:
        return next((e for e in self.engines if child in e.children), None)

    def lost(self, child: Child, group: ProcessGroup) -> str | None:
        """A child exited. If it belongs to an engine that can be restarted, stops the engine's other
        processes, schedules the restart and returns what to tell the user; None: the service must stop."""
        engine = self.owner(child)
        if engine is None or len(self.engines) == 1 or not engine.ever_ready:
            return None
        group.stop_children(engine.children)
        group.remove(engine.children)
        if self.metrics_dir is not None:
            from scheduler_svc import metrics

            for c in engine.children:
                metrics.mark_dead(c.popen.pid, str(self.metrics_dir))
        wait = engine.backoff_s
        engine.restart_at = time.monotonic() + wait
        engine.backoff_s = min(2 * engine.backoff_s, MAX_BACKOFF_S)
        engine.ready = False
        return (f"{engine.name} lost: the {child.name} process exited with code {child.popen.returncode}; "
                f"starting it again in {wait:g} s")

    def tick(self, group: ProcessGroup) -> list[str]:
        """Starts engines whose pause is over and notes which engines are ready; returns news to print."""
        news: list[str] = []
        now = time.monotonic()
        for e in self.engines if len(self.engines) > 1 else ():  # one engine: its readiness is the service's
            if e.restart_at is not None:
                if now >= e.restart_at:
                    news.append(f"{e.name} restarted: {', '.join(self.start(group, e))}")
                continue
            if e.ready or now < e.next_probe:
                continue
            e.next_probe = now + PROBE_INTERVAL_S
            probe = self._probes.get(e.name) or self._probes.setdefault(e.name, _ReadyProbe(e.scheduler_address))
            if probe.ready():
                e.ready = e.ever_ready = True
                e.backoff_s = FIRST_BACKOFF_S
                news.append(f"{e.name} ready")
        return news

    def close(self) -> None:
        for probe in self._probes.values():
            probe.close()
