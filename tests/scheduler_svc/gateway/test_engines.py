"""A gateway in front of several scripted fake schedulers, in process: prefix routing keeps a shared prefix
on one engine, an engine that goes away fails only its own streams while health stays SERVING and the
others take new requests, it is used again once back; discovery by DNS name; LoadService; metrics."""

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

import clients  # noqa: F401

# isort: split
from pagedserve.client import AsyncClient, Client, GenerationError, SamplingParams
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.gateway.engines import parse_engines
from scheduler_svc.gateway.router import Router
from scheduler_svc.gateway.server import Gateway
from tests.factories import make_checkpoint
from tests.scheduler_svc.gateway.test_server import FakeScheduler
from tests.waiting import wait_until_async

BLOCK = 16  # the fakes' block_size
MODEL = "demo"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL)


class NamedFake(FakeScheduler):
    """A FakeScheduler with a name, that can report a load on its streams."""

    def __init__(self, name, script):
        super().__init__(script)
        self.name = name

    async def GetEngineInfo(self, request, context):
        info = await super().GetEngineInfo(request, context)
        info.engine_name = self.name
        return info

    def report_load(self, **fields):
        for q in self._streams:
            q.put_nowait(scheduler_pb2.SchedulerEvent(load=scheduler_pb2.EngineLoad(**fields)))


class Fleet:
    """Fake schedulers on loopback ports, and a gateway in front of all of them."""

    def __init__(self, fakes):
        self.fakes = fakes
        self.servers: list[grpc.aio.Server | None] = [None] * len(fakes)
        self.ports = [0] * len(fakes)

    async def start_engine(self, i: int) -> None:
        server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self.fakes[i], server)
        self.ports[i] = server.add_insecure_port(f"127.0.0.1:{self.ports[i]}")
        await server.start()
        self.servers[i] = server

    async def stop_engine(self, i: int) -> None:
        await self.servers[i].stop(None)
        self.servers[i] = None

    def submits(self, i: int) -> list[str]:
        return [s.request_id for s in self.fakes[i].submits]


@contextlib.asynccontextmanager
async def fleet(model_dir, fakes, spec=None, **gateway_kwargs):
    f = Fleet(fakes)
    for i in range(len(fakes)):
        await f.start_engine(i)
    spec = spec or ",".join(f"127.0.0.1:{p}" for p in f.ports)
    gateway = Gateway(model_dir, spec.format(port=f.ports[0]), **gateway_kwargs)
    server = grpc.aio.server()
    gateway.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    health_task = await gateway.start()
    await server.start()
    client = AsyncClient(f"127.0.0.1:{port}")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await client.wait_ready(timeout=20)
        f.gateway, f.client, f.channel, f.target = gateway, client, channel, f"127.0.0.1:{port}"
        yield f
    finally:
        health_task.cancel()
        await channel.close()
        await client.close()
        await server.stop(None)
        await gateway.close()
        for i in range(len(fakes)):
            if f.servers[i] is not None:
                await f.stop_engine(i)


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 997 + 2 for i in range(n)]


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, {"model": MODEL, **labels}) or 0.0


def test_parse_engines():
    assert parse_engines("a:1, b:2") == (["a:1", "b:2"], None)
    assert parse_engines("unix:///tmp/x.sock") == (["unix:///tmp/x.sock"], None)
    assert parse_engines("dns:pagedserve-engine:50052") == ([], ("pagedserve-engine", 50052))
    assert parse_engines("dns:///engines.ns.svc:7") == ([], ("engines.ns.svc", 7))
    for bad in ("", "dns:nameonly", "a:1,a:1"):
        with pytest.raises(ValueError):
            parse_engines(bad)


def test_a_shared_prefix_stays_on_one_engine(model_dir):
    fakes = [NamedFake(f"e{i}", lambda s: [[7], [8]]) for i in range(2)]

    async def scenario():
        async with fleet(model_dir, fakes) as f:
            routed = {e: sample("pagedserve_router_requests_total", engine=e, reason="affinity") for e in ("e0", "e1")}
            for group in range(6):
                prefix = tokens(group, 2 * BLOCK)
                for i in range(4):
                    await f.client.complete(prefix + tokens(100 + i, 3 + i), SamplingParams(max_tokens=2),
                                            request_id=f"g{group}-{i}")
            homes = []
            for group in range(6):
                (home,) = {i for i in range(2) for r in f.submits(i) if r.startswith(f"g{group}-")}
                assert sorted(f.submits(home)).count(f"g{group}-0") == 1
                assert len([r for r in f.submits(home) if r.startswith(f"g{group}-")]) == 4
                homes.append(home)
            assert set(homes) == {0, 1}  # six keys: both engines have some
            for i, e in enumerate(("e0", "e1")):
                got = sample("pagedserve_router_requests_total", engine=e, reason="affinity") - routed[e]
                assert got == 4 * homes.count(i)

    asyncio.run(scenario())


def test_an_engine_that_goes_away_fails_only_its_streams_and_comes_back(model_dir):
    fakes = [NamedFake(f"e{i}", lambda s: [[7]] * 10_000 if s.request_id.startswith("long") else [[7], [8]])
             for i in range(2)]
    for fake in fakes:
        fake.step_s = 0.002

    async def scenario():
        async with fleet(model_dir, fakes, router=Router("least-loaded")) as f:
            streams = [f.client.generate([5, 6], SamplingParams(max_tokens=10_000), request_id=f"long{i}")
                       for i in range(2)]
            for s in streams:
                await s.__anext__()
            assert [len(f.submits(i)) for i in range(2)] == [1, 1]  # least loaded: one each
            on_first = streams[0] if f.submits(0) == ["long0"] else streams[1]
            other = streams[1] if on_first is streams[0] else streams[0]

            await f.stop_engine(0)
            with pytest.raises(GenerationError) as err:
                async for _ in on_first:
                    pass
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert await f.client.is_serving()
            done = await asyncio.gather(*(f.client.complete([5, 6], SamplingParams(max_tokens=2), request_id=f"n{i}")
                                          for i in range(8)))
            assert all(c.token_ids == [7, 8] for (c,) in done)
            assert sum(r.startswith("n") for r in f.submits(1)) == 8
            assert (await other.__anext__()).token_ids == (7,)  # the other engine's stream runs on
            other.cancel()

            await f.start_engine(0)  # back on the same address: used again
            await wait_until_async(lambda: f.gateway.engines.engines[f"127.0.0.1:{f.ports[0]}"].ready, 10,
                                   what="the engine to be ready again")
            for i in range(4):
                await f.client.complete([5, 6], SamplingParams(max_tokens=2), request_id=f"back{i}")
            assert sum(r.startswith("back") for r in f.submits(0)) == 2

            await f.stop_engine(0)
            await f.stop_engine(1)
            health = health_pb2_grpc.HealthStub(f.channel)

            async def not_serving():
                reply = await health.Check(health_pb2.HealthCheckRequest())
                return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            for _ in range(200):
                if await not_serving():
                    break
                await asyncio.sleep(0.05)
            assert await not_serving()

    asyncio.run(scenario())


def test_engines_found_by_dns_name(model_dir):
    fakes = [NamedFake("e0", lambda s: [[7], [8]])]

    async def scenario():
        async with fleet(model_dir, fakes, spec="dns:localhost:{port}", dns_refresh_s=0.2) as f:
            (done,) = await f.client.complete([5, 6], SamplingParams(max_tokens=2))
            assert done.token_ids == [7, 8]
            pool = f.gateway.engines
            assert f"127.0.0.1:{f.ports[0]}" in pool.engines
            pool._update([])  # the name no longer lists it: retired, dropped (nothing in flight)
            assert not pool.engines and not pool.connected

    asyncio.run(scenario())


def test_load_service_reports_what_the_engines_said(model_dir):
    fakes = [NamedFake(f"e{i}", lambda s: [[7], [8]]) for i in range(2)]

    async def scenario():
        async with fleet(model_dir, fakes) as f:
            watch = f.client.watch_load(interval=0.1)
            first = await anext(watch)
            assert [e.engine for e in first.engines] == ["e0", "e1"] and first.num_engines_ready == 2
            fakes[0].report_load(num_requests_running=3, num_requests_waiting=2, num_free_blocks=6, num_blocks=8,
                                 prefix_cache_queries=100, prefix_cache_hits=25)
            fakes[1].report_load(num_requests_running=1, num_free_blocks=8, num_blocks=8)
            await wait_until_async(lambda: all(e.load is not None for e in f.gateway.engines.engines.values()), 10,
                                   what="both load reports")
            report = await f.client.load()
            e0, e1 = report.engines
            assert (e0.num_requests_running, e0.num_requests_waiting, e0.num_free_blocks) == (3, 2, 6)
            assert (e0.kv_cache_usage, e0.prefix_cache_hit_rate) == (pytest.approx(0.25), pytest.approx(0.25))
            assert (report.model, report.num_requests_running, report.num_requests_waiting) == (MODEL, 4, 2)
            assert report.kv_cache_usage == pytest.approx(2 / 16)
            for _ in range(50):  # a watcher sees the same report once it changes
                if await asyncio.wait_for(anext(watch), 5) == report:
                    break
            else:
                pytest.fail("WatchLoad never sent the reported load")
            await watch.aclose()
            with Client(f.target) as sync_client:  # the sync client's view, from a thread
                assert await asyncio.to_thread(sync_client.load) == report
                assert await asyncio.to_thread(lambda: next(sync_client.watch_load(0.1))) == report

    asyncio.run(scenario())


def test_metrics_count_what_the_clients_received(model_dir):
    lengths = [1, 2, 5, 9, 3, 4]
    fakes = [NamedFake(f"e{i}", lambda s: [[7]] * int(s.request_id.split("-")[1])) for i in range(2)]
    names = ("pagedserve_time_to_first_token_seconds_count", "pagedserve_inter_token_latency_seconds_count",
             "pagedserve_e2e_request_latency_seconds_count")

    async def scenario():
        async with fleet(model_dir, fakes) as f:
            before = {n: sample(n) for n in names}
            tokens_before = sum(sample("pagedserve_generation_tokens_total", engine=e) for e in ("e0", "e1"))
            ok_before = sum(sample("pagedserve_requests_total", engine=e, status="OK") for e in ("e0", "e1"))

            async def one(i, n):
                chunks = [c async for c in f.client.generate([5, 6, 7], SamplingParams(max_tokens=n),
                                                             request_id=f"r{i}-{n}")]
                with_tokens = [len(c.token_ids) for c in chunks if c.token_ids]
                return sum(with_tokens), with_tokens[0]

            got = await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths)))
            received = sum(n for n, _ in got)
            assert received == sum(lengths)
            after = {n: sample(n) for n in names}
            assert after[names[0]] - before[names[0]] == len(lengths)
            assert after[names[1]] - before[names[1]] == sum(n - first for n, first in got)
            assert after[names[2]] - before[names[2]] == len(lengths)
            assert sum(sample("pagedserve_generation_tokens_total", engine=e) for e in ("e0", "e1")) - tokens_before \
                == received
            assert sum(sample("pagedserve_requests_total", engine=e, status="OK") for e in ("e0", "e1")) - ok_before \
                == len(lengths)
            assert sample("pagedserve_router_engine_ready", engine="e0") == 1.0

    asyncio.run(scenario())


def test_a_report_taken_during_a_burst_does_not_hold_an_idle_engine_as_busy():
    from types import SimpleNamespace

    from scheduler_svc.gateway.engines import Engine

    link = SimpleNamespace(num_in_flight=0)
    engine = Engine("127.0.0.1:1", link)
    assert engine.num_requests == 0  # no report yet
    link.num_in_flight = 8  # this gateway's burst, all of it in the engine's report
    engine.on_load(scheduler_pb2.EngineLoad(num_requests_running=6, num_requests_waiting=2))
    assert engine.num_requests == 8
    link.num_in_flight = 11  # three more sent since: not in the report yet
    assert engine.num_requests == 11
    link.num_in_flight = 0  # all ended before the engine's next report
    assert engine.num_requests == 0
    # Another gateway's requests count until a report says they ended; this one's own never fewer.
    engine.on_load(scheduler_pb2.EngineLoad(num_requests_running=5))
    assert engine.num_requests == 5
    link.num_in_flight = 2
    assert engine.num_requests == 7
