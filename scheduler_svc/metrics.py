"""Prometheus metrics: the HTTP endpoint every process role shares, and the scheduler's engine metrics.

Every role serves ``/metrics`` on its ``--metrics-port``. ``pagedserve serve`` runs several processes
(engines, gateways) behind one ``--metrics-port``: it sets ``PROMETHEUS_MULTIPROC_DIR`` for its children,
whose metrics then live in files there, and serves the sum over those files itself (prometheus-client's
multiprocess mode). Counters and histograms add up across processes; the engine gauges carry an ``engine``
label, so each engine's series stays its own (``livemostrecent``: a dead process's gauges disappear once
the launcher marks it dead, its counters keep counting in the total).

The engine metrics are set from the engine loop's load snapshots (at most every 100 ms), not per step.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, multiprocess, start_http_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# /metrics is plain HTTP without the gateway's TLS or token: this machine only unless --metrics-host says
# otherwise (Kubernetes, whose Prometheus scrapes the pod from outside, says 0.0.0.0).
DEFAULT_HOST = "127.0.0.1"
ENGINE_LABELS = ("model", "engine")

_RUNNING = Gauge("pagedserve_num_requests_running", "Requests with a sequence running on the engine.",
                 ENGINE_LABELS, multiprocess_mode="livemostrecent")
_WAITING = Gauge("pagedserve_num_requests_waiting", "Requests waiting for admission on the engine.",
                 ENGINE_LABELS, multiprocess_mode="livemostrecent")
_SWAPPED = Gauge("pagedserve_num_requests_swapped", "Requests with sequences swapped out to the CPU pool.",
                 ENGINE_LABELS, multiprocess_mode="livemostrecent")
_KV_USAGE = Gauge("pagedserve_kv_cache_usage_ratio", "Share of the KV blocks held by requests (0 to 1).",
                  ENGINE_LABELS, multiprocess_mode="livemostrecent")
_NUM_BLOCKS = Gauge("pagedserve_kv_cache_num_blocks", "KV blocks in the engine's pool.",
                    ENGINE_LABELS, multiprocess_mode="livemostrecent")
_PREFIX_QUERIES = Counter("pagedserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                          ENGINE_LABELS)
_PREFIX_HITS = Counter("pagedserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", ENGINE_LABELS)
_PREEMPTIONS = Counter("pagedserve_num_preemptions", "Sequences preempted (recomputed or swapped).",
                       ENGINE_LABELS)


class EngineMetrics:
    """One engine's series. The engine reports cumulative counts; the counters advance by the difference."""

    def __init__(self, model: str, engine: str) -> None:
        labels = {"model": model, "engine": engine}
        self._gauges = [g.labels(**labels) for g in (_RUNNING, _WAITING, _SWAPPED, _KV_USAGE, _NUM_BLOCKS)]
        self._counters = [c.labels(**labels) for c in (_PREFIX_QUERIES, _PREFIX_HITS, _PREEMPTIONS)]
        self._last = [0, 0, 0]

    def update(self, load) -> None:
        """``load``: a pagedserve.internal.v1.EngineLoad."""
        used = 1.0 - load.num_free_blocks / load.num_blocks if load.num_blocks else 0.0
        values = (load.num_requests_running, load.num_requests_waiting, load.num_requests_swapped, used,
                  load.num_blocks)
        for gauge, value in zip(self._gauges, values, strict=True):
            gauge.set(value)
        totals = (load.prefix_cache_queries, load.prefix_cache_hits, load.num_preemptions)
        for i, (counter, total) in enumerate(zip(self._counters, totals, strict=True)):
            if total > self._last[i]:
                counter.inc(total - self._last[i])
                self._last[i] = total


def registry(path: str | None = None):
    """What /metrics shows: this process's metrics, or, in multiprocess mode (``path`` or the environment
    names the directory), every process's in that directory."""
    path = path or os.environ.get(MULTIPROC_ENV)
    if not path:
        return REGISTRY
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=path)
    return reg


def serve_metrics(port: int, host: str = DEFAULT_HOST, path: str | None = None) -> int:
    """Serves /metrics over HTTP from a daemon thread; returns the port (``port`` 0 picks a free one)."""
    server, _ = start_http_server(port, addr=host, registry=registry(path))
    return server.server_port


def mark_dead(pid: int, path: str) -> None:
    """Drops a dead process's live gauges from the multiprocess view (its counters keep counting)."""
    multiprocess.mark_process_dead(pid, path)


def add_arguments(p) -> None:
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (default: off)")
    p.add_argument("--metrics-host", default=DEFAULT_HOST,
                   help=f"address of --metrics-port, plain HTTP without TLS or token (default {DEFAULT_HOST}: this "
                   "machine only; 0.0.0.0 to let a scraper elsewhere in)")
