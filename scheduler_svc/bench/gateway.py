"""``pagedserve bench gateway``: how many tokens per second the gateways carry, with no GPU.

Real gateway processes (``--gateways N``, sharing a port as ``serve`` starts them) in front of a
synthetic engine (synthetic_engine.py: the scheduler's gRPC face, one event per step for all streams,
a step every ``--step-ms`` or as soon as the gateways have taken the last one, whichever is later),
with the model's real tokenizer, real detokenization and stop checks, real gRPC, and
``--client-processes`` client processes keeping ``--streams`` streams busy (each stream sends its next
request when the last one ends). Tokens and responses are counted over a window after a warm-up; CPU
per process over the same window (and, with ``--profile-dir``, py-spy stacks); time to first token and
inter-token latency as the clients saw them. The last line printed is
``gateway capacity: X tokens/s (N gateways, S streams)``: the tokens per second the clients received.
A gateway that cannot write every step to every stream coalesces (several tokens per response): the
tokens per response printed say how far.

This is how a change to the serving path is judged on a CPU machine: the engine costs next to nothing,
so the figure is the text side's and the transport's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from scheduler_svc.bench import load_clients, process_profile
from scheduler_svc.command import Command
from scheduler_svc.gateway_group import GatewayFailed, GatewayGroup, default_num_gateways
from scheduler_svc.launcher import ProcessGroup

PROMPT = "Write a long story about a river, a city and the mountains around them."
# The synthetic engine's default step floor: a third of the fastest decode step we run at 256 sequences
# (W06 on the H200: 5.8 ms), so the engine is never the limit, yet every step carries all the running
# streams as a real engine's does. With no floor (--step-ms 0) the engine races through the few
# requests it holds between the clients' new ones, one tiny event after another, and the figure says
# more about that race than about the gateway.
DEFAULT_STEP_MS = 2.0


def _model_dir(args, tmp: Path) -> Path:
    if args.model:
        if not (Path(args.model) / "tokenizer.json").exists():
            raise SystemExit(f"pagedserve bench gateway: {args.model}/tokenizer.json not found")
        return Path(args.model)
    from gpu_worker.demo_model import write_demo_model  # the demo's byte-level BPE (and tiny weights)

    return write_demo_model(tmp / "demo")


def _start_service(args, tmp: Path, model: Path, group: ProcessGroup) -> tuple[GatewayGroup, dict[str, int]]:
    engine_address = f"unix://{tmp}/engine.sock"
    engine = group.start("engine", [sys.executable, "-m", "scheduler_svc.bench.synthetic_engine", "--model",
                                    str(model), "--listen", engine_address, "--step-ms", str(args.step_ms),
                                    "--exit-with-parent"])
    gateways = GatewayGroup(group, tmp, args.gateways, "127.0.0.1", 0,
                            ["--model", str(model), "--scheduler", engine_address, "--log-level", "warning"])
    gateways.check_port()
    gateways.start()
    deadline = time.monotonic() + 120
    while not gateways.ready:
        if engine.popen.poll() is not None:
            raise SystemExit(f"pagedserve bench gateway: the synthetic engine exited:\n{group.log_tail(engine)}")
        try:
            gateways.poll()
        except GatewayFailed as exc:
            raise SystemExit(f"pagedserve bench gateway: {exc}\n{group.log_tail(exc.child)}") from None
        if time.monotonic() > deadline:
            raise SystemExit("pagedserve bench gateway: the gateways were not SERVING within 120 s")
        time.sleep(0.05)
    pids = {c.name if args.gateways > 1 else "gateway0": c.popen.pid for c in gateways.children}
    return gateways, pids | {"engine": engine.popen.pid}


def _clients(args, model: Path, port: int) -> load_clients.ClientPool:
    shares = [n for n in load_clients.split(args.streams, min(args.client_processes, args.streams)) if n]
    jobs = [load_clients.ClosedLoopJob(f"127.0.0.1:{port}", n, args.max_tokens, PROMPT, args.warmup,
                                       args.duration, str(model)) for n in shares]
    return load_clients.ClientPool(jobs, shares)  # one channel (connection) per stream, up to 64


def run(args) -> int:
    if args.streams < 1 or args.gateways < 1 or args.client_processes < 1 or args.duration <= 0:
        raise SystemExit("pagedserve bench gateway: --streams, --gateways, --client-processes and --duration "
                         "must be positive")
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-gateway-") as tmp_name:
        tmp = Path(tmp_name)
        log_dir = Path(args.log_dir) if args.log_dir else tmp / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        group = ProcessGroup(log_dir)
        pool = None
        try:
            model = _model_dir(args, tmp)
            gateways, pids = _start_service(args, tmp, model, group)
            pool = _clients(args, model, gateways.port)
            pool.wait_ready(120)
            pids |= {f"client{i}": pid for i, pid in enumerate(pool.pids)}
            profile = process_profile.ProcessProfile(pids, Path(args.profile_dir or tmp / "profile"),
                                                     sample=bool(args.profile_dir))
            t0 = pool.go()
            time.sleep(max(0.0, t0 + args.warmup - time.monotonic()))
            profile.start()
            time.sleep(max(0.0, t0 + args.warmup + args.duration - time.monotonic()))
            cpu = profile.stop()
            results = pool.results(args.duration + 120)
        finally:
            if pool is not None:
                pool.close()
            group.stop()
    report = _report(args, results, cpu)
    print(process_profile.format_report(cpu))
    print(f"window {args.duration:g} s after {args.warmup:g} s of warm-up: {report['tokens']:,} tokens in "
          f"{report['responses']:,} responses ({report['tokens_per_response']:.2f} tokens each), "
          f"{report['requests']:,} requests finished; text of {report['checked']} requests checked: "
          f"{'exact' if not report['mismatches'] else str(report['mismatches']) + ' MISMATCHED'}")
    print("at the clients: time to first token (ms) " + "  ".join(f"{k} {v:.1f}" for k, v in report["ttft_ms"].items())
          + "; inter-token latency (ms) " + "  ".join(f"{k} {v:.2f}" for k, v in report["itl_ms"].items()))
    per_token = {name: 1e6 * r["cpu_s"] / max(1, report["tokens"]) for name, r in cpu.items() if "cpu_s" in r}
    print("CPU per token delivered (us): " + "  ".join(f"{k} {v:.1f}" for k, v in per_token.items()))
    if args.profile_dir:
        _print_stages(Path(args.profile_dir), report)
    print(f"load average at the end: {report['load_average']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"gateway capacity: {report['tokens_per_s']:,.0f} tokens/s "
          f"({args.gateways} gateways, {args.streams} streams)")
    return 1 if report["mismatches"] else 0


def _report(args, results: list[dict], cpu: dict) -> dict:
    total = {k: sum(r[k] for r in results) for k in ("tokens", "responses", "requests", "checked", "mismatches")}
    itl = [x for r in results for x in r["itl_s"]]
    ttft = [x for r in results for x in r["ttft_s"]]
    return total | {
        "gateways": args.gateways, "streams": args.streams, "client_processes": len(results),
        "max_tokens": args.max_tokens, "step_ms": args.step_ms, "model": str(args.model or "demo tokenizer"),
        "duration_s": args.duration, "tokens_per_s": total["tokens"] / args.duration,
        "responses_per_s": total["responses"] / args.duration,
        "tokens_per_response": total["tokens"] / max(1, total["responses"]),
        "itl_ms": load_clients.percentiles_ms(itl), "ttft_ms": load_clients.percentiles_ms(ttft),
        "load_average": [round(x, 2) for x in os.getloadavg()], "processes": cpu,
    }


def _print_stages(profile_dir: Path, report: dict) -> None:
    """The gateways' CPU per token delivered, split by stage (py-spy samples x CPU seconds)."""
    for name, r in report["processes"].items():
        stacks = profile_dir / f"{name}.txt"
        if not name.startswith("gateway") or not stacks.exists():
            continue
        per_token_us = 1e6 * r["cpu_s"] / max(1, report["tokens"])
        shares = process_profile.stage_shares(stacks, process_profile.GATEWAY_STAGES)
        report.setdefault("stages_us_per_token", {})[name] = {k: v * per_token_us for k, v in shares.items()}
        print(f"{name} CPU per token by stage ({per_token_us:.1f} us in all):")
        for stage, share in shares.items():
            print(f"  {stage:<42} {share * per_token_us:6.2f} us  {100 * share:5.1f}%")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", type=int, default=256, help="concurrent streams (default 256)")
    p.add_argument("--gateways", type=int, default=1, help="gateway processes sharing the port (default 1)")
    p.add_argument("--client-processes", type=int, default=default_num_gateways(),
                   help=f"client processes (default: half the CPUs, 1 to 8; here {default_num_gateways()})")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per request (default 256)")
    p.add_argument("--model", help="directory with the tokenizer.json to use (default: the demo model's "
                   "byte-level BPE; `pagedserve demo-model --trained DIR` writes SmolLM2's)")
    p.add_argument("--step-ms", type=float, default=DEFAULT_STEP_MS,
                   help=f"the synthetic engine's least step time (default {DEFAULT_STEP_MS:g}; 0: as fast as "
                   "the gateways read)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the window (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds counted (default 10)")
    p.add_argument("--profile-dir", help="also sample every process's Python stacks with py-spy into DIR")
    p.add_argument("--log-dir", help="keep the processes' logs here")
    p.add_argument("--out", help="write the report as JSON here")


COMMAND = Command("gateway", "tokens/s the gateways carry against a synthetic engine (no GPU)",
                  "Run gateway processes against a synthetic engine that emits tokens as fast as they are taken "
                  "(real tokenizer, detokenization and gRPC; client processes keep --streams streams busy) and "
                  "print the tokens/s delivered to the clients.", add_arguments, run)
