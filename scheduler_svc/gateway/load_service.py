"""pagedserve.v1.LoadService: the engines' load as this gateway last heard it, for routers and endpoint
pickers in front of pagedserve (polled with GetLoad or watched with WatchLoad)."""

from __future__ import annotations

import asyncio

import clients  # noqa: F401
from pagedserve.v1 import load_pb2, load_pb2_grpc
from scheduler_svc.gateway.engines import Engine, EnginePool

SERVICE_NAME = load_pb2.DESCRIPTOR.services_by_name["LoadService"].full_name
DEFAULT_INTERVAL_MS = 1000
MIN_INTERVAL_MS = 100


def engine_load(engine: Engine) -> load_pb2.EngineLoad:
    out = load_pb2.EngineLoad(engine=engine.name, address=engine.address, ready=engine.ready,
                              num_requests_from_gateway=engine.link.num_in_flight)
    load = engine.load
    if load is not None:
        out.num_requests_running = load.num_requests_running
        out.num_requests_waiting = load.num_requests_waiting
        out.num_free_blocks, out.num_blocks = load.num_free_blocks, load.num_blocks
        out.kv_cache_usage = 1.0 - load.num_free_blocks / load.num_blocks if load.num_blocks else 0.0
        out.prefix_cache_queries, out.prefix_cache_hits = load.prefix_cache_queries, load.prefix_cache_hits
        if load.prefix_cache_queries:
            out.prefix_cache_hit_rate = load.prefix_cache_hits / load.prefix_cache_queries
    return out


def load_report(pool: EnginePool, model: str) -> load_pb2.GetLoadResponse:
    engines = sorted(pool.engines.values(), key=lambda e: (e.name, e.address))
    report = load_pb2.GetLoadResponse(model=model, engines=[engine_load(e) for e in engines])
    ready = [e for e in report.engines if e.ready]
    report.num_engines_ready = len(ready)
    report.num_requests_running = sum(e.num_requests_running for e in ready)
    report.num_requests_waiting = sum(e.num_requests_waiting for e in ready)
    num_blocks = sum(e.num_blocks for e in ready)
    if num_blocks:
        report.kv_cache_usage = 1.0 - sum(e.num_free_blocks for e in ready) / num_blocks
    return report


class LoadServicer(load_pb2_grpc.LoadServiceServicer):
    def __init__(self, pool: EnginePool, model: str) -> None:
        self.pool = pool
        self.model = model

    async def GetLoad(self, request, context):
        return load_report(self.pool, self.model)

    async def WatchLoad(self, request, context):
        interval_s = max(request.interval_ms or DEFAULT_INTERVAL_MS, MIN_INTERVAL_MS) / 1000
        last = None
        while True:
            report = load_report(self.pool, self.model)
            if report != last:
                await context.write(report)
                last = report
            await asyncio.sleep(interval_s)
