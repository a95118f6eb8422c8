"""`pagedserve serve --engines 2` end to end on CPU: a shared prefix stays on one engine (read from the
service's /metrics) and hits the prefix cache as often as on one engine, round-robin measurably less;
the metrics count what the clients received; an engine killed with streams in flight fails only its
own streams, the other engine takes the next requests, and the restarted engine serves again.

The service runs two gateway processes behind one port (one consistent /metrics across them).
"""

import asyncio
import os
import signal
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import clients  # noqa: F401

# isort: split
from pagedserve.client import AsyncClient, GenerationError, SamplingParams
from scheduler_svc.bench.routing import GroupWorkload, drive_groups, make_groups
from scheduler_svc.service import LOAD_IDLE_S
from tests.e2e.test_serving import CONTEXT_LEN, Service
from tests.factories import make_checkpoint
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

NUM_GROUPS, GROUP_SIZE, PREFIX_LEN = 4, 8, 128  # 8 blocks of 16 shared by each group
ENGINES = ("engine0", "engine1")
REQUIRED = (
    "pagedserve_num_requests_running", "pagedserve_num_requests_waiting", "pagedserve_kv_cache_usage_ratio",
    "pagedserve_prefix_cache_queries_total", "pagedserve_prefix_cache_hits_total", "pagedserve_num_preemptions_total",
    "pagedserve_prompt_tokens_total", "pagedserve_generation_tokens_total", "pagedserve_router_requests_total",
    "pagedserve_time_to_first_token_seconds_count", "pagedserve_inter_token_latency_seconds_count",
    "pagedserve_e2e_request_latency_seconds_count",
)


class Fleet(Service):
    """A `serve --engines 2 --metrics-port 0` service with both engines ready."""

    def __init__(self, model, log_dir, *extra):
        super().__init__(model, log_dir, "--engines", "2", "--metrics-port", "0", *extra)
        self.metrics_url = self.wait_for(r"metrics on (http://[^\s\"]+)").replace("0.0.0.0", "127.0.0.1")
        for e in ENGINES:
            self.wait_for(rf"({e}) ready")

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def total(self, name: str, **labels) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= ls)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", max_position_embeddings=CONTEXT_LEN)


@pytest.fixture(scope="module")
def workload(checkpoint):
    # Seed 2: the rendezvous hashes of the four prefixes put two groups on each engine.
    return make_groups(NUM_GROUPS, NUM_GROUPS * GROUP_SIZE, PREFIX_LEN, "4-20", "4", vocab=1000, seed=2)


def hit_rate(outcomes) -> float:
    return sum(o.cached_tokens for o in outcomes) / sum(o.prompt_tokens for o in outcomes)


def run_groups(target: str, work: GroupWorkload, num_engines: int = 1):
    """Each request's outcome, sent once the gateway routes to ``num_engines`` engines (the launcher's
    "ready" lines come first: a gateway that still sees one engine would send it everything)."""
    return asyncio.run(drive_groups(target, work, concurrency=None, num_engines=num_engines))[1]


@pytest.fixture(scope="module")
def single_engine_hit_rate(checkpoint, workload, tmp_path_factory):
    svc = Service(checkpoint, tmp_path_factory.mktemp("logs1"))
    try:
        return hit_rate(run_groups(svc.target, workload))
    finally:
        assert svc.stop() == 0


@pytest.fixture(scope="module")
def fleet(checkpoint, tmp_path_factory):
    svc = Fleet(checkpoint, tmp_path_factory.mktemp("logs2"), "--gateways", "2")
    yield svc
    assert svc.stop() == 0, "\n".join(svc.lines)


def test_groups_land_on_one_engine_and_hit_the_cache_as_one_engine_does(fleet, workload, single_engine_hit_rate):
    outcomes = []
    homes = []
    for prompts, lens in zip(workload.groups, workload.output_lens, strict=True):
        before = {e: fleet.total("pagedserve_router_requests_total", engine=e) for e in ENGINES}
        outcomes += run_groups(fleet.target, GroupWorkload([prompts], [lens]), num_engines=2)
        got = {e: fleet.total("pagedserve_router_requests_total", engine=e) - before[e] for e in ENGINES}
        assert sorted(got.values()) == [0, GROUP_SIZE], got  # the whole group on one engine
        homes.append(max(got, key=got.get))
    assert sorted(homes) == ["engine0", "engine0", "engine1", "engine1"]
    fleet_rate = hit_rate(outcomes)
    print(f"prefix-cache hit rate: one engine {single_engine_hit_rate:.3f}, two with prefix routing "
          f"{fleet_rate:.3f}; groups on {homes}")
    # One engine: a group's first request computes the prefix, the other seven find it (about 7/8 of the
    # prefix tokens). Round-robin computes it on both engines: at most 6/8, i.e. 6/7 of one engine's.
    assert single_engine_hit_rate > 0.5
    assert abs(fleet_rate - single_engine_hit_rate) <= 0.1 * single_engine_hit_rate
    assert sum(fleet.total("pagedserve_prefix_cache_hits_total", engine=e) for e in ENGINES) == \
        sum(o.cached_tokens for o in outcomes)


def test_metrics_count_what_the_clients_received(fleet):
    names = {n for n, _ in fleet.metrics()}
    assert set(REQUIRED) <= names, set(REQUIRED) - names
    before = {n: fleet.total(n) for n in REQUIRED}

    async def one(client, i):
        chunks = [c async for c in client.generate([20 + i] * (3 + i), SamplingParams(max_tokens=5 + i % 4,
                                                                                     ignore_eos=True))]
        with_tokens = [len(c.token_ids) for c in chunks if c.token_ids]
        return sum(with_tokens), with_tokens[0]

    async def run():
        async with AsyncClient(fleet.target) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    got = asyncio.run(run())
    delta = {n: fleet.total(n) - before[n] for n in REQUIRED}
    assert delta["pagedserve_generation_tokens_total"] == sum(n for n, _ in got)
    assert delta["pagedserve_time_to_first_token_seconds_count"] == len(got)
    assert delta["pagedserve_e2e_request_latency_seconds_count"] == len(got)
    assert delta["pagedserve_inter_token_latency_seconds_count"] == sum(n - first for n, first in got)
    assert delta["pagedserve_router_requests_total"] == len(got)
    assert delta["pagedserve_prompt_tokens_total"] == sum(3 + i for i in range(12))


def test_killing_an_engine_fails_only_its_streams(fleet):
    async def long_stream(client, i, started: asyncio.Event, counts: list):
        received = 0
        try:
            async for chunk in client.generate([30 + i, 31, 32], SamplingParams(max_tokens=3000, ignore_eos=True)):
                received += len(chunk.token_ids)
                counts[i] = received
                started.set()
                if received >= 3000:
                    return "finished"
        except GenerationError as exc:
            return exc.code
        return "ended"

    # The previous tests' requests have ended and every gateway has the engines' idle reports (an idle
    # engine's reaches its streams within LOAD_IDLE_S): the four streams split two and two.
    wait_until(lambda: fleet.total("pagedserve_num_requests_running") + fleet.total("pagedserve_num_requests_waiting")
               == 0, 30, 0.05, what="the fleet to be idle")
    time.sleep(2 * LOAD_IDLE_S)

    async def scenario():
        async with AsyncClient(fleet.target) as client:
            counts = [0] * 4
            events = [asyncio.Event() for _ in range(4)]
            before = {e: fleet.total("pagedserve_router_requests_total", engine=e) for e in ENGINES}
            tasks = [asyncio.create_task(long_stream(client, i, events[i], counts)) for i in range(4)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
            on_engine0 = fleet.total("pagedserve_router_requests_total", engine="engine0") - before["engine0"]
            assert on_engine0 == 2  # short prompts go to the least loaded: two streams each
            os.kill(fleet.pids["scheduler0"], signal.SIGKILL)
            done, _ = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(1.0)
            ended = [t for t in tasks if t.done()]
            assert [t.result() for t in ended] == [grpc.StatusCode.UNAVAILABLE] * 2, [t.result() for t in ended]
            survivors = [i for i, t in enumerate(tasks) if not t.done()]
            progress = [counts[i] for i in survivors]
            await asyncio.sleep(1.0)
            assert all(counts[i] > p for i, p in zip(survivors, progress, strict=True)), "the other engine stalled"
            for i in survivors:
                tasks[i].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

            before = fleet.total("pagedserve_router_requests_total", engine="engine1")
            results = await asyncio.wait_for(asyncio.gather(*(
                client.complete([40 + i, 41, 42], SamplingParams(max_tokens=4, ignore_eos=True)) for i in range(16))),
                120)
            assert all(len(c.token_ids) == 4 for (c,) in results)
            assert fleet.total("pagedserve_router_requests_total", engine="engine1") - before == 16

    asyncio.run(scenario())
    fleet.wait_for(r"(engine0) restarted")
    wait_until(lambda: sum("engine0 ready" in line for line in fleet.lines) >= 2, 180, 0.2,
               what="engine0 to be ready again")
    wait_until(lambda: fleet.total("pagedserve_router_engine_ready", engine="engine0") == 1, 30, 0.2,
               what="the gateway to use engine0 again")
    before = fleet.total("pagedserve_router_requests_total", engine="engine0")

    async def again():
        async with AsyncClient(fleet.target) as client:
            await asyncio.gather(*(client.complete([50 + i], SamplingParams(max_tokens=2)) for i in range(8)))

    asyncio.run(again())
    assert fleet.total("pagedserve_router_requests_total", engine="engine0") > before


def test_round_robin_hits_the_cache_measurably_less(checkpoint, workload, single_engine_hit_rate, tmp_path):
    svc = Fleet(checkpoint, tmp_path / "logs", "--routing", "round-robin")
    try:
        rate = hit_rate(run_groups(svc.target, workload, num_engines=2))
    finally:
        assert svc.stop() == 0
    print(f"prefix-cache hit rate: one engine {single_engine_hit_rate:.3f}, two with round-robin {rate:.3f}")
    assert rate < 0.9 * single_engine_hit_rate
