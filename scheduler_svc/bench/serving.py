"""``pagedserve bench serving``: a seeded workload through the gRPC gateways at a fixed concurrency, a
Poisson request rate, or a sweep of rates; throughput, time to first token and inter-token latency
percentiles, and the load generator's own CPU.

The streams are spread over ``--client-processes`` processes (load_clients.py), each request on one of
its process's connections, so that the client is not what is measured and the gateways sharing the port
each get connections. ``--request-rates 10,20,inf`` runs the workload once per rate (``inf``: all at
once, bounded by ``--concurrency``) on one running service, each rate with its own prompts (no prefix
cache hits from the run before), prints a table and, with ``--out``, writes a PNG of latency against
throughput next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_worker.engine_args import EngineArgs
from scheduler_svc.bench import load_clients, process_profile, routing
from scheduler_svc.bench.service_model import vocab_size, write_placeholder_tokenizer
from scheduler_svc.bench.throughput import (
    BENCH_DEFAULTS,
    add_workload_args,
    make_workload,
    resolve_workload,
    run_ours,
    write_shape_config,
)
from scheduler_svc.command import Command
from scheduler_svc.gateway_group import default_num_gateways


def parse_rates(text: str) -> list[float | None]:
    """'5,10,inf' -> [5.0, 10.0, None]; None sends every request at once."""
    rates: list[float | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        rate = None if part in ("inf", "max") else float(part)
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"a request rate must be positive or inf, got {part!r}")
        rates.append(rate)
    return rates


def _client_pool(target: str, work, rate: float | None, concurrency: int | None, num_processes: int, seed: int,
                 warm=None) -> load_clients.ClientPool:
    """Requests dealt round-robin to the processes, each with its share of the concurrency."""
    n = len(work.prompts)
    limit = concurrency or n
    k = max(1, min(num_processes, limit, n))
    arrivals = load_clients.poisson_arrivals(n, rate, seed)
    requests = [(i, work.prompts[i], work.output_lens[i], arrivals[i]) for i in range(n)]
    warm_prompts = warm.prompts if warm is not None else []
    shares = load_clients.split(limit, k)
    jobs = [load_clients.TimedJob(target, requests[p::k], shares[p], warm_prompts[p::k]) for p in range(k)]
    return load_clients.ClientPool(jobs, shares)


def _report(timings: list[load_clients.Timing], seconds: float) -> dict:
    out_tokens = sum(t.num_tokens for t in timings)
    ttft = [t.first - t.start for t in timings if t.first is not None]
    itl = [x for t in timings for x in t.inter_token_latencies()]
    return {
        "requests": len(timings), "seconds": seconds, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / seconds,
        "ttft_ms": load_clients.percentiles_ms(ttft),
        "itl_ms": load_clients.percentiles_ms(itl),
        "median_itl_ms": 1e3 * statistics.median(itl) if itl else float("nan"),
    }


def _one_point(args, target: str, work, rate: float | None, seed: int, warm, find_service) -> dict:
    """One timed run at one rate (None: all at once) with its own client processes."""
    pool = _client_pool(target, work, rate, args.concurrency, args.client_processes, seed, warm)
    try:
        pool.wait_ready()
        names = find_service() | {f"client{i}": pid for i, pid in enumerate(pool.pids)}
        out_dir = Path(args.profile_dir or ".")
        if args.request_rates:  # one folder of stacks per rate
            out_dir /= "rate-" + ("all" if rate is None else f"{rate:g}")
        profile = process_profile.ProcessProfile(names, out_dir, sample=bool(args.profile_dir))
        t0 = pool.go()
        time.sleep(max(0.0, t0 - time.monotonic()))
        profile.start()
        timings = [t for share in pool.results() for t in share]
        cpu = profile.stop()
    finally:
        pool.close()
    seconds = max(t.chunk_times[-1] for t in timings if t.chunk_times) - t0
    wall = cpu["_wall_s"]["wall_s"]
    for i, cpu_s in enumerate(pool.cpu_s):  # the clients' own account: they exit before /proc is read
        cpu[f"client{i}"] |= {"cpu_s": cpu_s, "cores": cpu_s / wall}
    report = _report(timings, seconds) | {"request_rate": rate, "processes": cpu}
    report["client_cores"] = sum(r["cores"] for name, r in cpu.items() if name.startswith("client"))
    return report


def _start_service(args, engine: EngineArgs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scheduler_svc.cli", "serve", *engine.to_argv("serve"),
                             "--port", str(args.port), "--gateways", str(args.gateways), "--log-level", "warning",
                             *routing.serve_argv(args)])


def run(args) -> int:
    if routing.wanted(args):  # the shared-prefix workload, and the routing comparison
        return routing.run(args)
    resolve_workload(args, with_shape=not (args.model or args.target))  # a given model keeps its own shape
    if args.offline_too and args.target and not (args.model or args.shape):
        raise SystemExit("pagedserve bench serving: --offline-too with --target needs --model or --shape: the "
                         "offline run starts its own engine of that model")
    try:
        rates = parse_rates(args.request_rates) if args.request_rates else [args.request_rate]
    except ValueError as exc:
        raise SystemExit(f"pagedserve bench serving: {exc}") from None
    if args.client_processes < 1 or args.gateways < 1:
        raise SystemExit("pagedserve bench serving: --client-processes and --gateways must be at least 1")
    with tempfile.TemporaryDirectory(prefix="pagedserve-bench-") as tmp:
        model_dir, load_format = (Path(args.model), "auto") if args.model else (Path(tmp) / str(args.shape), "dummy")
        vocab = vocab_size(args, model_dir)
        # One workload per rate, each with its own prompts (seed + 1 is the warm-up's).
        works = [make_workload(args.num_prompts, args.input_len, args.output_len, vocab,
                               args.seed + (2 * i if i else 0)) for i in range(len(rates))]
        # Other prompts of the same lengths (no prefix-cache hits later), sent first.
        warm = make_workload(args.num_prompts, args.input_len, args.output_len, vocab, args.seed + 1)
        try:
            engine = EngineArgs.from_args(args, "bench-serving", model=str(model_dir), load_format=load_format)
        except ValueError as exc:
            raise SystemExit(f"pagedserve bench serving: {exc}") from None
        server = None
        target = args.target
        if not target:
            if args.shape and not args.model:
                longest = max(len(p) + n for w in works for p, n in zip(w.prompts, w.output_lens, strict=True))
                write_shape_config(args.shape, model_dir, longest)
                write_placeholder_tokenizer(model_dir, vocab)
            target = f"127.0.0.1:{args.port}"
            server = _start_service(args, engine)
        try:
            print(f"serving benchmark: {len(works[0].prompts)} requests per rate to {target}, concurrency "
                  f"{args.concurrency or 'unbounded'}, rates {', '.join(_rate_label(r) for r in rates)}; "
                  f"{args.gateways if server else '?'} gateways, {args.client_processes} client processes",
                  flush=True)

            def find_service() -> dict[str, int]:
                return process_profile.service_processes(server.pid) if server is not None else {}

            points = []
            for i, (rate, work) in enumerate(zip(rates, works, strict=True)):
                # No warm-up for a service that is already running, nor after the first rate.
                point = _one_point(args, target, work, rate, args.seed + i, warm if i == 0 and not args.target
                                   else None, find_service)
                points.append(point)
                _print_point(point)
                if args.profile_dir:
                    print(process_profile.format_report(point["processes"]), flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=120)
        # The figures at the top: the run with every request at once if there is one (the peak), else the first.
        main = next((i for i, r in enumerate(rates) if r is None), 0)
        report = dict(points[main])
        if len(points) > 1:
            report["sweep"] = points
        if args.offline_too:
            offline = run_ours(engine, works[main], warm)  # the same engine settings as the service above
            report["offline_output_tok_s"] = offline.output_tok_s
            report["serving_over_offline"] = report["output_tok_s"] / offline.output_tok_s
    _print_summary(report, points, args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        if len(points) > 1:
            title = f"{args.workload or args.model or args.shape}, concurrency {args.concurrency or 'unbounded'}"
            print(plot_sweep(points, Path(args.out).with_suffix(".png"), title))
    return 0


def _rate_label(rate: float | None) -> str:
    return "all at once" if rate is None else f"{rate:g}/s"


def _print_point(p: dict) -> None:
    print(f"rate {_rate_label(p['request_rate'])}: {p['output_tok_s']:,.0f} output tok/s "
          f"({p['output_tokens']} tokens in {p['seconds']:.2f} s); TTFT p50 {p['ttft_ms']['p50']:.1f} "
          f"p99 {p['ttft_ms']['p99']:.1f} ms; ITL p50 {p['itl_ms']['p50']:.2f} p99 {p['itl_ms']['p99']:.2f} ms; "
          f"clients {p['client_cores']:.2f} cores", flush=True)


def _print_summary(report: dict, points: list[dict], args) -> None:
    if len(points) > 1:
        peak = max(p["output_tok_s"] for p in points)
        print("\n| request rate | output tok/s | % of peak | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
              "| client cores |\n|---|---:|---:|---:|---:|---:|---:|---:|")
        for p in points:
            print(f"| {_rate_label(p['request_rate'])} | {p['output_tok_s']:,.0f} "
                  f"| {100 * p['output_tok_s'] / peak:.0f} | {p['ttft_ms']['p50']:.1f} | {p['ttft_ms']['p99']:.1f} "
                  f"| {p['itl_ms']['p50']:.2f} | {p['itl_ms']['p99']:.2f} | {p['client_cores']:.2f} |")
    print(f"\nthroughput: {report['output_tok_s']:,.0f} output tok/s ({report['output_tokens']} tokens in "
          f"{report['seconds']:.2f} s)")
    print("time to first token (ms): " + "  ".join(f"{k} {v:.1f}" for k, v in report["ttft_ms"].items()))
    print("inter-token latency (ms): " + "  ".join(f"{k} {v:.2f}" for k, v in report["itl_ms"].items()))
    print(f"load generator: {args.client_processes} processes, {report['client_cores']:.2f} cores")
    if args.offline_too:
        print(f"offline: {report['offline_output_tok_s']:,.0f} output tok/s; serving / offline = "
              f"{100 * report['serving_over_offline']:.1f}%")


def plot_sweep(points: list[dict], path: Path, title: str = "") -> str:
    """TTFT and ITL (p50, p99) against throughput, one point per rate; returns a line to print."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed"
    xs = [p["output_tok_s"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "itl_ms", "inter-token latency")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            order = sorted(range(len(points)), key=lambda i: xs[i])
            ax.plot([xs[i] for i in order], [points[i][key][q] for i in order], style, label=q)
        for x, p in zip(xs, points, strict=True):
            ax.annotate(_rate_label(p["request_rate"]), (x, p[key]["p99"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set(xlabel="output tokens/s", ylabel="ms", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="a running gateway HOST:PORT (default: start `pagedserve serve` here)")
    add_workload_args(p)
    p.add_argument("--concurrency", type=int, help="requests in flight at most (default: all)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--request-rates", help="a sweep: comma-separated rates per second, 'inf' for all at once "
                   "(e.g. 20,40,80,inf); one run each, a table, and a plot next to --out")
    p.add_argument("--offline-too", action="store_true",
                   help="also run the (first rate's) workload offline, for the ratio")
    p.add_argument("--port", type=int, default=50071, help="port of the gateways started here (default 50071)")
    p.add_argument("--gateways", type=int, default=default_num_gateways(),
                   help="gateway processes of the service started here (default: serve's, here "
                   f"{default_num_gateways()})")
    p.add_argument("--client-processes", type=int, default=default_num_gateways(),
                   help=f"load generator processes (default: half the CPUs, 1 to 8; here {default_num_gateways()})")
    EngineArgs.add_args(p.add_argument_group("engine"), "bench-serving", **BENCH_DEFAULTS)
    routing.add_arguments(p)
    p.add_argument("--out", help="write the report as JSON here (and a sweep's plot beside it, as .png)")
    p.add_argument("--profile-dir", help="measure each process's CPU time over the timed region and, with py-spy "
                   "on the PATH, sample its Python stacks into DIR (see scheduler_svc/bench/process_profile.py)")


COMMAND = Command("serving", "throughput and latency through the gRPC gateway",
                  "Send a seeded workload through pagedserve gateways (started here, or --target) from several "
                  "client processes and report throughput, time to first token and inter-token latency, at one "
                  "request rate or a sweep of them.", add_arguments, run)
