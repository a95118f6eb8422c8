"""The scheduler process: a gRPC SchedulerService for gateways in front of the engine loop.

Start-up order: bind the workers' ZeroMQ socket and the gRPC port, answer GetEngineInfo with
ready=false, wait for every worker's hello, size and allocate the pool, then serve.

Each Connect stream also carries the engine's load (``EngineLoad``) to its gateway: on the next event
after the engine retook it, or alone when the stream has been quiet for ``LOAD_IDLE_S``.
"""

from __future__ import annotations

import argparse
import queue
import signal
import socket
import threading
from concurrent import futures

import grpc

import clients  # noqa: F401
from gpu_worker import lifetime, log
from gpu_worker.engine_args import EngineArgs
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc import metrics
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import SHUTTING_DOWN, EngineCore
from scheduler_svc.engine_metrics import EngineMetrics
from scheduler_svc.worker_group import WorkerGroup

_END = object()
LOAD_IDLE_S = 0.25
_logger = log.get_logger()
# The gateways ping their Connect streams (keepalive, every --scheduler-keepalive seconds, at least
# gateway.scheduler_link.MIN_KEEPALIVE_S = 2 x this) to notice an engine whose host vanished, also while
# no data flows. The server must permit that, or after two early pings it answers GOAWAY too_many_pings
# and drops the stream (grpcio's default minimum interval is 5 minutes). The option's name is
# min_ping_interval_without_data_ms (grpc core's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS);
# a misspelt option is ignored without a word.
MIN_PING_INTERVAL_MS = 500
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.keepalive_permit_without_calls", 1),
]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, engine_name: str = "") -> None:
        self.engine: EngineCore | None = None
        self.error: str | None = None
        self.engine_name = engine_name

    def GetEngineInfo(self, request, context):
        if self.engine is None:
            return scheduler_pb2.EngineInfo(ready=False, engine_name=self.engine_name)
        return self.engine.engine_info()

    def Connect(self, request_iterator, context):
        engine = self.engine
        if engine is None or engine.stopped.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, self.error or "the scheduler is not ready")
        events: queue.Queue = queue.Queue()
        stream_id = engine.open_stream(events.put)
        context.add_callback(lambda: engine.close_stream(stream_id))

        def pump() -> None:
            try:
                for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "submit":
                        engine.submit(stream_id, msg.submit)
                    elif kind == "abort":
                        engine.abort(stream_id, msg.abort.request_id)
            except grpc.RpcError:
                pass
            finally:
                events.put(_END)

        threading.Thread(target=pump, name=f"gateway-{stream_id}", daemon=True).start()
        load_version = -1
        while True:
            try:
                event = events.get(timeout=LOAD_IDLE_S)
            except queue.Empty:
                if engine.done.is_set():  # every request has had its last event: nothing more comes
                    reason = f"engine failed: {engine.failure}" if engine.failure else SHUTTING_DOWN
                    context.abort(grpc.StatusCode.UNAVAILABLE, reason)
                event = None
            if event is _END:
                engine.close_stream(stream_id)
                return
            if engine.load_version != load_version:
                load_version = engine.load_version
                if event is None:
                    event = scheduler_pb2.SchedulerEvent()
                event.load.CopyFrom(engine.load)
            if event is not None:
                yield event


class _StoppedDuringStartup(Exception):
    """SIGINT/SIGTERM arrived while the scheduler still waited for its workers."""


def serve(
    config: SchedulerConfig,
    listen: str,
    worker_address: str,
    world_size: int = 1,
    alive=None,
    on_listening=None,
    stop_event: threading.Event | None = None,
    engine_name: str = "",
    model_name: str = "",
) -> int:
    """Runs the scheduler until stopped; returns the exit code (non-zero after a worker failure)."""
    workers = WorkerGroup(worker_address, world_size, heartbeat_timeout=config.heartbeat_timeout)
    servicer = SchedulerServicer(engine_name)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=SERVER_OPTIONS)
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    server.start()
    if on_listening is not None:
        on_listening(port, workers.address)
    stop_event = stop_event or threading.Event()
    code = 0

    def alive_unless_stopped() -> bool:  # a stop while the workers start (Ctrl-C during the model load) ends the wait
        if stop_event.is_set() and servicer.engine is None:
            raise _StoppedDuringStartup
        return alive is None or alive()

    try:
        engine_metrics = EngineMetrics(model_name, engine_name, config.block_size)
        engine = EngineCore(config, workers, alive_unless_stopped, on_load=engine_metrics.update)
        engine.info.engine_name = engine_name
        servicer.engine = engine
        stopper = threading.Thread(target=lambda: (stop_event.wait(), engine.stop()), daemon=True)
        stopper.start()
        engine.run()
    except _StoppedDuringStartup:
        pass  # asked to stop before serving: nothing to report
    except Exception as exc:
        servicer.error = str(exc)
        _logger.error("scheduler failed", error=f"{type(exc).__name__}: {exc}")
        code = 1
    finally:
        workers.shutdown()
        server.stop(grace=2).wait()
        workers.close()
    return code


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="pagedserve scheduler")
    p.description = "Run the scheduler: block tables, continuous batching, StepPlans to the workers."
    # Internal sockets: loopback unless told otherwise (Kubernetes passes --listen=0.0.0.0:50052 for the
    # gateways of other pods; the workers share the scheduler's pod).
    p.add_argument("--listen", default="127.0.0.1:50052",
                   help="gRPC address for gateways (host:port or unix:PATH; default 127.0.0.1:50052)")
    p.add_argument("--workers", default="tcp://127.0.0.1:5557",
                   help="ZeroMQ address the workers connect to (default tcp://127.0.0.1:5557)")
    p.add_argument("--engine-name", default=socket.gethostname(),
                   help="this engine's name for the gateways and the engine label of its metrics (default: the "
                   "host name, the pod name in Kubernetes)")
    p.add_argument("--model-name", default="", help="the model label of the metrics (default: empty)")
    metrics.add_arguments(p)
    EngineArgs.add_args(p, "scheduler")
    lifetime.add_argument(p)
    log.add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig.from_engine_args(EngineArgs.from_args(args, "scheduler"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        engine = EngineArgs.from_args(args, "scheduler")
    except ValueError as exc:
        parser.error(str(exc))
    if args.exit_with_parent:
        lifetime.exit_with_parent()
    log.configure("scheduler", args.log_level, args.log_format)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def listening(port: int, worker_address: str) -> None:
        _logger.info("listening", grpc=args.listen, port=port, workers=worker_address)
        if args.metrics_port is not None:
            _logger.info("serving metrics", metrics_host=args.metrics_host,
                         metrics_port=metrics.serve_metrics(args.metrics_port, args.metrics_host))

    return serve(SchedulerConfig.from_engine_args(engine), args.listen, args.workers, engine.tensor_parallel_size,
                 on_listening=listening, stop_event=stop, engine_name=args.engine_name, model_name=args.model_name)
