"""Prometheus metrics: the HTTP endpoint every process role shares.

Every role serves ``/metrics`` on its ``--metrics-port``. ``pagedserve serve`` runs several processes
(engines, gateways) behind one ``--metrics-port``: it sets ``PROMETHEUS_MULTIPROC_DIR`` for its children,
whose metrics then live in files there, and serves the sum over those files itself (prometheus-client's
multiprocess mode). Counters and histograms add up across processes; the engine gauges carry an ``engine``
label, so each engine's series stays its own (``livemostrecent``: a dead process's gauges disappear once
the launcher marks it dead, its counters keep counting in the total).

The engine's own metrics are scheduler_svc.engine_metrics (defined in the scheduler process only).
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# /metrics is plain HTTP without the gateway's TLS or token: this machine only unless --metrics-host says
# otherwise (Kubernetes, whose Prometheus scrapes the pod from outside, says 0.0.0.0).
DEFAULT_HOST = "127.0.0.1"


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
