"""The gateway's Prometheus metrics: what its clients saw, and where the router sent their requests.

Token counters and request counts carry the ``engine`` that served the request (the engine's name, as in
the scheduler's own metrics); the latency histograms carry only the model, to keep their series few.
``pagedserve_generation_tokens_total`` counts the tokens sent to clients (a stop token included, as in
Usage.completion_tokens). Time to first token runs from the call's arrival at the gateway; inter-token
latency spreads the gap before each response over the tokens it carries (tokens that arrive together with
the first one are not counted). The multiprocess modes apply under ``pagedserve serve`` (see
scheduler_svc/metrics.py).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                 80.0)
_ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)

PROMPT_TOKENS = Counter("pagedserve_prompt_tokens", "Prompt tokens of the requests sent to an engine.",
                        ("model", "engine"))
GENERATION_TOKENS = Counter("pagedserve_generation_tokens", "Generated tokens sent to clients.",
                            ("model", "engine"))
REQUESTS = Counter("pagedserve_requests", "Requests ended, by gRPC status (engine 'none': never routed).",
                   ("model", "engine", "status"))
TTFT = Histogram("pagedserve_time_to_first_token_seconds", "From a request's arrival to its first token.",
                 ("model",), buckets=_TTFT_BUCKETS)
ITL = Histogram("pagedserve_inter_token_latency_seconds", "Time between tokens of a stream.", ("model",),
                buckets=_ITL_BUCKETS)
E2E = Histogram("pagedserve_e2e_request_latency_seconds", "From a request's arrival to its end (status OK).",
                ("model",), buckets=_E2E_BUCKETS)
IN_FLIGHT = Gauge("pagedserve_gateway_requests_in_flight", "Requests the gateway is serving.", ("model",),
                  multiprocess_mode="livesum")
ROUTED = Counter("pagedserve_router_requests", "Requests routed to an engine, by the router's reason "
                 "(affinity, spill: its affinity engine was over the load bound, least_loaded, round_robin).",
                 ("model", "engine", "reason"))
ENGINE_READY = Gauge("pagedserve_router_engine_ready", "1 while the gateway routes requests to the engine.",
                     ("model", "engine"), multiprocess_mode="livemin")


class RequestTimer:
    """Time to first token and inter-token latency of one request, fed the request's token count as
    responses go out."""

    __slots__ = ("_ttft", "_itl", "start", "last", "num_tokens")

    def __init__(self, ttft, itl) -> None:
        self._ttft, self._itl = ttft, itl
        self.start = self.last = time.monotonic()
        self.num_tokens = 0

    def tokens(self, num_tokens: int) -> None:
        """``num_tokens``: the request's tokens sent so far, all samples."""
        new = num_tokens - self.num_tokens
        if new <= 0:
            return
        now = time.monotonic()
        if self.num_tokens == 0:
            self._ttft.observe(now - self.start)
        else:
            gap = (now - self.last) / new
            for _ in range(new):
                self._itl.observe(gap)
        self.num_tokens, self.last = num_tokens, now


class GatewayMetrics:
    """The series of one served model (label children looked up once)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._ttft, self._itl, self._e2e = TTFT.labels(model), ITL.labels(model), E2E.labels(model)
        self.in_flight = IN_FLIGHT.labels(model)

    def timer(self) -> RequestTimer:
        return RequestTimer(self._ttft, self._itl)

    def finished(self, engine: str, status: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """Counts an ended request; ``engine`` is empty when it never reached one."""
        REQUESTS.labels(self.model, engine or "none", status).inc()
        if engine:
            PROMPT_TOKENS.labels(self.model, engine).inc(prompt_tokens)
            GENERATION_TOKENS.labels(self.model, engine).inc(completion_tokens)
        if status == "OK":
            self._e2e.observe(seconds)

    def routed(self, engine: str, reason: str) -> None:
        ROUTED.labels(self.model, engine, reason).inc()

    def engine_ready(self, engine: str, ready: bool) -> None:
        ENGINE_READY.labels(self.model, engine).set(1 if ready else 0)
