"""The engine's load snapshot (what the Connect streams carry to the gateways' routers) and the scheduler's
metrics made from it, against the in-process fake workers of test_engine."""

import threading
import time

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2
from scheduler_svc import engine_metrics as metrics
from tests.scheduler_svc.test_engine import FakeWorkers, finished, make_engine, next_token, run_until, submit


def test_load_after_a_shared_prefix_reports_the_cache_hits():
    engine, workers = make_engine(enable_prefix_caching=True)
    loads: list[scheduler_pb2.EngineLoad] = []
    engine.on_load = loads.append
    events: list = []
    prefix = list(range(20, 32))  # three full blocks of 4

    sent = []

    def sink(event):
        events.append(event)
        if not sent and finished(events, {"a"}):  # after a: its three blocks are cached
            sent.append(engine.submit(stream, submit("b", prefix + [2, 3], 3)))

    stream = engine.open_stream(sink)
    engine.submit(stream, submit("a", prefix + [1], 3))
    assert run_until(engine, lambda: finished(events, {"b"}) and engine.load.num_requests_running == 0) is None
    load = engine.load
    assert (load.num_requests_running, load.num_requests_waiting, load.num_requests_swapped) == (0, 0, 0)
    assert (load.num_blocks, load.num_free_blocks) == (64, 64)
    assert (load.prefix_cache_queries, load.prefix_cache_hits) == (27, 12)
    assert loads[-1] == load and len(loads) == engine.load_version + 1  # the first: the idle engine's
    assert engine.engine_info().stats.num_queried_prompt_tokens == 27


def slow_next_token(token_ids: list[int]) -> int:
    time.sleep(0.002)  # steps long enough for the loop to retake its load while busy
    return next_token(token_ids)


def test_load_counts_requests_running_and_waiting():
    engine, workers = make_engine(FakeWorkers(sample=slow_next_token), max_num_seqs=2)
    seen: list[scheduler_pb2.EngineLoad] = []
    events: list = []
    stream = engine.open_stream(events.append)
    for i in range(5):
        engine.submit(stream, submit(f"r{i}", [3 + i] * 5, 40))
    engine.on_load = seen.append
    done = threading.Event()

    def until():
        if any(ld.num_requests_running == 2 and ld.num_requests_waiting == 3 for ld in seen):
            done.set()
        return done.is_set()

    assert run_until(engine, until) is None
    assert done.is_set()
    assert all(ld.num_free_blocks < ld.num_blocks for ld in seen if ld.num_requests_running)


def test_engine_metrics_follow_the_snapshots():
    m = metrics.EngineMetrics("m", "engine-test", 16)

    def value(name):
        return REGISTRY.get_sample_value(name, {"model": "m", "engine": "engine-test"})

    m.update(scheduler_pb2.EngineLoad(num_requests_running=2, num_requests_waiting=1, num_free_blocks=6, num_blocks=8,
                                      prefix_cache_queries=40, prefix_cache_hits=10, num_preemptions=1))
    m.update(scheduler_pb2.EngineLoad(num_requests_running=1, num_free_blocks=2, num_blocks=8,
                                      prefix_cache_queries=100, prefix_cache_hits=30, num_preemptions=1))
    assert (value("pagedserve_num_requests_running"), value("pagedserve_num_requests_waiting")) == (1, 0)
    assert value("pagedserve_kv_cache_usage_ratio") == 0.75
    assert value("pagedserve_prefix_cache_queries_total") == 100
    assert value("pagedserve_prefix_cache_hits_total") == 30
    assert value("pagedserve_num_preemptions_total") == 1


def test_the_endpoint_pickers_metrics_have_its_types_and_meanings():
    """What llm-d's endpoint picker scrapes (the model-server protocol), read back from the exposition text
    as a scraper does: waiting and running requests and KV usage (0-1) are gauges, and cache_config_info is
    a gauge of 1 labelled with block_size and num_gpu_blocks."""
    m = metrics.EngineMetrics("llm", "pod-7", 16)
    m.update(scheduler_pb2.EngineLoad(num_requests_running=3, num_requests_waiting=5, num_free_blocks=150,
                                      num_blocks=200))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}

    def sample(name):
        family = families[name]
        (s,) = [s for s in family.samples if s.labels.get("engine") == "pod-7"]
        return family.type, s.labels, s.value

    labels = {"model": "llm", "engine": "pod-7"}
    assert sample("pagedserve_num_requests_waiting") == ("gauge", labels, 5)
    assert sample("pagedserve_num_requests_running") == ("gauge", labels, 3)
    assert sample("pagedserve_kv_cache_usage_ratio") == ("gauge", labels, 0.25)
    assert sample("pagedserve_cache_config_info") == ("gauge", {**labels, "block_size": "16", "num_gpu_blocks": "200"},
                                                      1)
