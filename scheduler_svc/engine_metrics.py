"""The scheduler's engine metrics, set from the engine loop's load snapshots (at most every 100 ms), not
per step. Defined here, apart from the shared /metrics endpoint (scheduler_svc.metrics), so that only the
scheduler process registers them.

Four of them are what the Gateway API Inference Extension's endpoint picker (llm-d) scrapes to schedule
requests, with the types and meanings of its model-server protocol: ``pagedserve_num_requests_waiting``
(gauge: requests queued, its TotalQueuedRequests), ``pagedserve_num_requests_running`` (gauge),
``pagedserve_kv_cache_usage_ratio`` (gauge, 0 to 1: blocks held by requests over all blocks; free blocks
that still cache a prefix count as free, as in vLLM's ``kv_cache_usage_perc``) and
``pagedserve_cache_config_info`` (gauge 1 labelled ``block_size`` and ``num_gpu_blocks``); the picker's
flags that map its names to these are in k8s/README.md.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
# The model-server protocol's cache description (vLLM's cache_config_info): value 1, the facts in labels.
_CACHE_CONFIG = Gauge("pagedserve_cache_config_info", "The engine's KV cache: block size in tokens and blocks "
                      "in the device pool, as labels (value 1).", (*ENGINE_LABELS, "block_size", "num_gpu_blocks"),
                      multiprocess_mode="livemostrecent")
_PREFIX_QUERIES = Counter("pagedserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                          ENGINE_LABELS)
_PREFIX_HITS = Counter("pagedserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", ENGINE_LABELS)
_PREEMPTIONS = Counter("pagedserve_num_preemptions", "Sequences preempted (recomputed or swapped).",
                       ENGINE_LABELS)


class EngineMetrics:
    """One engine's series. The engine reports cumulative counts; the counters advance by the difference."""

    def __init__(self, model: str, engine: str, block_size: int) -> None:
        self._labels = {"model": model, "engine": engine}
        self._block_size = block_size
        self._gauges = [g.labels(**self._labels) for g in (_RUNNING, _WAITING, _SWAPPED, _KV_USAGE, _NUM_BLOCKS)]
        self._counters = [c.labels(**self._labels) for c in (_PREFIX_QUERIES, _PREFIX_HITS, _PREEMPTIONS)]
        self._last = [0, 0, 0]
        self._num_blocks = 0  # in cache_config_info's labels

    def update(self, load) -> None:
        """``load``: a pagedserve.internal.v1.EngineLoad."""
        if load.num_blocks != self._num_blocks:  # the pool is sized once, at start
            if self._num_blocks:
                _CACHE_CONFIG.remove(*self._labels.values(), str(self._block_size), str(self._num_blocks))
            self._num_blocks = load.num_blocks
            _CACHE_CONFIG.labels(**self._labels, block_size=str(self._block_size),
                                 num_gpu_blocks=str(load.num_blocks)).set(1)
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
