"""``pagedserve serve``: the scheduler, the worker(s) and a gateway as processes that live and die together.

The launcher only supervises. It prints where the gateway listens and when the service is ready.
SIGINT or SIGTERM drains: the gateway goes NOT_SERVING and gives running streams ``--drain-timeout``
seconds to finish, then the scheduler and the workers stop; exit 0. A child that exits on its own
stops the others and the launcher exits 1: never a half-alive service.

The scheduler and the workers talk over a unix socket and an ipc socket in a private temporary
directory; only the gateway's port is public.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpu_worker.model_files import resolve_model
from scheduler_svc.launcher import Child, ProcessGroup, cli_command

POLL_S = 0.1
HEALTH_POLL_S = 0.5


def _say(message: str) -> None:
    print(f"pagedserve: {message}", flush=True)


def _child_args(args: argparse.Namespace, tmp: Path, sched_addr: str, worker_addr: str) -> dict[str, list[list[str]]]:
    world = args.tensor_parallel_size
    sizes = ["--block-size", str(args.block_size), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    scheduler = ["--listen", sched_addr, "--workers", worker_addr, "--world-size", str(world),
                 "--max-num-seqs", str(args.max_num_seqs), *sizes]
    if args.max_model_len is not None:
        scheduler += ["--max-model-len", str(args.max_model_len)]
    if not args.enable_prefix_caching:
        scheduler.append("--no-prefix-caching")
    if not args.async_scheduling:
        scheduler.append("--no-async-scheduling")
    workers = []
    for rank in range(world):
        device = f"{args.device}:{rank}" if args.device == "cuda" and world > 1 else args.device
        workers.append([
            "--model", args.model, "--scheduler", worker_addr, "--device", device, "--dtype", args.dtype,
            "--rank", str(rank), "--world-size", str(world), "--kv-cache-memory", args.kv_cache_memory,
            "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--seed", str(args.seed),
            "--max-num-seqs", str(args.max_num_seqs), "--swap-space", str(args.swap_space),
            "--load-format", args.load_format, *(["--enforce-eager"] if args.enforce_eager else []),
            "--exit-with-parent", *sizes,
        ])
    gateway = ["--model", args.model, "--scheduler", sched_addr, "--host", args.host, "--port", str(args.port),
               "--drain-timeout", str(args.drain_timeout), "--port-file", str(tmp / "gateway.port"),
               "--log-level", args.log_level, "--exit-with-parent"]
    if args.model_name:
        gateway += ["--model-name", args.model_name]
    return {"scheduler": [scheduler], "worker": workers, "gateway": [gateway]}


class _HealthProbe:
    """Asks the gateway's grpc.health.v1 whether it is SERVING (grpc is imported only when serving)."""

    def __init__(self, host: str, port: int) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        target_host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host in ("::", "[::]") else host
        self._grpc, self._pb2 = grpc, health_pb2
        self._channel = grpc.insecure_channel(f"{target_host}:{port}")
        self._stub = health_pb2_grpc.HealthStub(self._channel)

    def serving(self) -> bool:
        try:
            reply = self._stub.Check(self._pb2.HealthCheckRequest(), timeout=1.0)
        except self._grpc.RpcError:
            return False
        return reply.status == self._pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()


class Launcher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="pagedserve-"))
        self.scheduler_address = f"unix://{self.tmp}/scheduler.sock"
        self.worker_address = f"ipc://{self.tmp}/workers.sock"
        self.group = ProcessGroup(Path(args.log_dir) if args.log_dir else None)
        self.signals = 0
        self.signalled = threading.Event()

    def _on_signal(self, *_: object) -> None:
        self.signals += 1
        self.signalled.set()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        if self.args.log_dir:
            Path(self.args.log_dir).mkdir(parents=True, exist_ok=True)
        try:
            gateway = self._start()
            return self._supervise(gateway)
        finally:
            self.group.stop()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _start(self) -> Child:
        started = []
        children = _child_args(self.args, self.tmp, self.scheduler_address, self.worker_address)
        for role, arg_lists in children.items():
            for i, role_args in enumerate(arg_lists):
                name = role if len(arg_lists) == 1 else f"{role}{i}"
                child = self.group.start(name, cli_command(role, *role_args))
                started.append(f"{name} (pid {child.popen.pid})")
        _say(f"started {', '.join(started)}")
        _say(f"scheduler on {self.scheduler_address}, workers on {self.worker_address}")
        return self.group.children[-1]

    def _supervise(self, gateway: Child) -> int:
        port_file = self.tmp / "gateway.port"
        probe: _HealthProbe | None = None
        next_probe = 0.0
        try:
            while not self.signalled.is_set():
                dead = self.group.first_dead()
                if dead is not None:
                    return self._failed(dead)
                if probe is None and port_file.exists():
                    port = int(port_file.read_text())
                    host = self.args.host
                    _say(f"gateway listening on {f'[{host}]' if ':' in host else host}:{port}")
                    probe = _HealthProbe(host, port)
                if probe is not None and next_probe >= 0 and time.monotonic() >= next_probe:
                    if probe.serving():
                        _say(f"ready: serving {self.args.model} (device {self.args.device})")
                        next_probe = -1.0  # announce once
                    else:
                        next_probe = time.monotonic() + HEALTH_POLL_S
                self.signalled.wait(POLL_S)
        finally:
            if probe is not None:
                probe.close()
        return self._drain(gateway)

    def _failed(self, dead: Child) -> int:
        print(f"pagedserve: the {dead.name} process exited with code {dead.popen.returncode}; stopping the "
              "service", file=sys.stderr, flush=True)
        tail = self.group.log_tail(dead)
        if tail:
            print(tail, file=sys.stderr, flush=True)
        return 1

    def _drain(self, gateway: Child) -> int:
        """The gateway first (it finishes running streams), then the rest."""
        _say(f"draining: running streams get {self.args.drain_timeout:g} s to finish")
        self.signalled.clear()
        gateway.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.args.drain_timeout + 15.0
        while gateway.popen.poll() is None:
            others = [c for c in self.group.children if c is not gateway and c.popen.poll() is not None]
            if others:
                return self._failed(others[0])
            if self.signals > 1 or time.monotonic() > deadline:
                _say("stopping now")
                return 1
            self.signalled.wait(POLL_S)
            self.signalled.clear()
        if gateway.popen.returncode not in (0, -signal.SIGTERM):  # killed outright: stopped before serving
            return self._failed(gateway)
        self.group.stop()
        _say("stopped")
        return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, ...")
    p.add_argument("--host", default="0.0.0.0", help="gateway address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="gateway port; 0 picks a free one (default 50051)")
    p.add_argument("--model-name", default=None, help="model name clients may send (default: the directory's name)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--kv-cache-memory", default="256MiB", help="KV pool size on CPU (default 256MiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and the KV pool (default 0.9)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences per step (default 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per step, prefill chunks included (default 2048)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="cap on prompt plus completion length (default: the model's)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the KV blocks of identical prompt prefixes")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="plan each step only after the previous step's results (default: plan the next "
                   "decode step while the workers run the current one)")
    p.add_argument("--swap-space", type=float, default=4.0,
                   help="GiB of CPU memory per worker for swapped-out KV blocks (default 4)")
    p.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights of the checkpoint's shapes, for benchmarks (default auto)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="worker processes, one per GPU (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling (default 0)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running streams get to finish after SIGINT/SIGTERM (default 30)")
    p.add_argument("--log-dir", default=None, help="write each process's output to DIR/NAME.log (default: stderr)")
    p.add_argument("--log-level", default="info", help="gateway log level (default info)")


def run(args: argparse.Namespace) -> int:
    try:
        resolve_model(args.model)  # a Hugging Face directory or a GGUF checkpoint
    except (OSError, ValueError) as exc:
        raise SystemExit(f"pagedserve serve: {exc}") from None
    if args.tensor_parallel_size < 1:
        raise SystemExit("pagedserve serve: --tensor-parallel-size must be at least 1")
    return Launcher(args).run()
