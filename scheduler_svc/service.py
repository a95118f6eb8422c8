"""The scheduler process: a gRPC SchedulerService for gateways in front of the engine loop.

Start-up order: bind the workers' ZeroMQ socket and the gRPC port, answer GetEngineInfo with
ready=false, wait for every worker's hello, size and allocate the pool, then serve.
"""

from __future__ import annotations

import argparse
import queue
import signal
import threading
from concurrent import futures

import grpc

import clients  # noqa: F401
from gpu_worker import lifetime
from gpu_worker.engine_args import EngineArgs
from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.engine import SHUTTING_DOWN, EngineCore
from scheduler_svc.worker_group import WorkerGroup

_END = object()


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self) -> None:
        self.engine: EngineCore | None = None
        self.error: str | None = None

    def GetEngineInfo(self, request, context):
        if self.engine is None:
            return scheduler_pb2.EngineInfo(ready=False)
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
        while True:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                if engine.done.is_set():  # every request has had its last event: nothing more comes
                    reason = f"engine failed: {engine.failure}" if engine.failure else SHUTTING_DOWN
                    context.abort(grpc.StatusCode.UNAVAILABLE, reason)
                continue
            if event is _END:
                engine.close_stream(stream_id)
                return
            yield event


def serve(
    config: SchedulerConfig,
    listen: str,
    worker_address: str,
    world_size: int = 1,
    alive=None,
    on_listening=None,
    stop_event: threading.Event | None = None,
) -> int:
    """Runs the scheduler until stopped; returns the exit code (non-zero after a worker failure)."""
    workers = WorkerGroup(worker_address, world_size)
    servicer = SchedulerServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=[
        ("grpc.max_receive_message_length", 64 * 2**20),
        ("grpc.max_send_message_length", 64 * 2**20),
    ])
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(listen)
    server.start()
    if on_listening is not None:
        on_listening(port, workers.address)
    stop_event = stop_event or threading.Event()
    code = 0
    try:
        engine = EngineCore(config, workers, alive)
        servicer.engine = engine
        stopper = threading.Thread(target=lambda: (stop_event.wait(), engine.stop()), daemon=True)
        stopper.start()
        engine.run()
    except Exception as exc:
        servicer.error = str(exc)
        print(f"scheduler: {type(exc).__name__}: {exc}", flush=True)
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
    EngineArgs.add_args(p, "scheduler")
    lifetime.add_argument(p)
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
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def listening(port: int, worker_address: str) -> None:
        print(f"scheduler: gRPC on {args.listen} (port {port}), workers on {worker_address}", flush=True)

    return serve(SchedulerConfig.from_engine_args(engine), args.listen, args.workers, engine.tensor_parallel_size,
                 on_listening=listening, stop_event=stop)
