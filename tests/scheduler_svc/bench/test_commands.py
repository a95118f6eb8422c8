"""The benchmark commands end to end on CPU at toy sizes (their figures matter on a GPU; here the
plumbing, the accounting and the report format are checked)."""

import json
import re
import subprocess
import sys

import pytest

from scheduler_svc.bench.throughput import SHAPES, Workload, make_workload, parse_lengths, roofline_seconds
from tests.factories import make_checkpoint


def test_lengths_and_workloads_are_seeded():
    import random

    assert parse_lengths("7", 3, random.Random(0)) == [7, 7, 7]
    a = parse_lengths("100-1024", 50, random.Random(0))
    assert a == parse_lengths("100-1024", 50, random.Random(0)) and min(a) >= 100 and max(a) <= 1024
    w = make_workload(4, "10", "5-6", vocab=1000, seed=3)
    assert [len(p) for p in w.prompts] == [10] * 4 and w.num_output_tokens == sum(w.output_lens)
    assert w.prompts == make_workload(4, "10", "5-6", vocab=1000, seed=3).prompts


def test_roofline_is_bandwidth_bound_for_decode():
    cfg = SHAPES["llama3-8b"]
    one_decode_step = Workload(prompts=[[1]], output_lens=[2])  # one prefill token, one decode step
    ceilings = {"copy_gbps": 1e3, "matmul_tflops": 1e6}  # 1 TB/s; compute is free here
    seconds = roofline_seconds(cfg, one_decode_step, ceilings)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    weights = layers * (h * cfg["head_dim"] * (2 * 32 + 2 * 8) + 3 * h * cfg["intermediate_size"])
    weights += h * cfg["vocab_size"]
    # one step reads every weight once (bf16) plus the KV of 2 tokens, at 1 TB/s
    kv = 2 * 2 * layers * 8 * 128 * 2
    assert seconds == pytest.approx((2 * weights + kv) / 1e12, rel=1e-3)


@pytest.mark.slow
def test_bench_throughput_on_cpu_writes_its_report(tmp_path):
    model = make_checkpoint(tmp_path / "m")
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "bench", "throughput", "--model", str(model), "--device", "cpu",
         "--num-prompts", "4", "--input-len", "8-16", "--output-len", "4", "--compare", "hf-static",
         "--hf-batch-size", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pagedserve" in proc.stdout and "hf-static" in proc.stdout and "roofline" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["system"] for r in report["results"]] == ["pagedserve", "hf-static"]
    ours = report["results"][0]
    assert ours["output_tokens"] == 16 and ours["output_tok_s"] > 0
    assert ours["profile"]["steps"] >= 4  # a prefill step and three decodes at least


@pytest.mark.slow
def test_bench_throughput_takes_a_gguf_checkpoint(tmp_path):
    """--model DIR holding a .gguf file: config from its metadata, transformers' own GGUF load for hf-static."""
    from tests.gguf_files import Q, write_gguf

    model_dir = tmp_path / "gguf"
    write_gguf(make_checkpoint(tmp_path / "m"), model_dir / "model.gguf", lambda name: Q.F32)
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "bench", "throughput", "--model", str(model_dir), "--device", "cpu",
         "--num-prompts", "2", "--input-len", "8", "--output-len", "3", "--compare", "hf-static", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["system"], r["output_tokens"]) for r in report["results"]] == [("pagedserve", 6), ("hf-static", 6)]


def test_bench_serving_reads_the_vocabulary_of_a_gguf_checkpoint(tmp_path):
    from types import SimpleNamespace

    from scheduler_svc.bench.service_model import vocab_size
    from tests.gguf_files import Q, write_gguf

    model_dir = tmp_path / "gguf"
    checkpoint = make_checkpoint(tmp_path / "m")
    write_gguf(checkpoint, model_dir / "model.gguf", lambda name: Q.F32)
    want = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    assert vocab_size(SimpleNamespace(model=str(model_dir)), model_dir) == want


@pytest.mark.slow
def test_bench_serving_on_cpu_reports_latencies(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = make_checkpoint(tmp_path / "m")
    out = tmp_path / "serving.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "bench", "serving", "--model", str(model), "--device", "cpu",
         "--num-prompts", "4", "--input-len", "8", "--output-len", "6", "--concurrency", "2", "--port", str(port),
         "--offline-too", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"] == 4 and report["output_tokens"] == 24
    assert 0 < report["ttft_ms"]["p50"] <= report["ttft_ms"]["p99"]
    assert report["itl_ms"]["p50"] > 0 and "inter-token latency" in proc.stdout
    assert report["offline_output_tok_s"] > 0 and report["serving_over_offline"] > 0


def test_rates_shares_and_arrivals():
    from scheduler_svc.bench.load_clients import Timing, poisson_arrivals, split
    from scheduler_svc.bench.serving import parse_rates

    assert parse_rates("5, 10,inf") == [5.0, 10.0, None]
    for bad in ("0", "-3", "nan", "x"):
        with pytest.raises(ValueError):
            parse_rates(bad)
    assert split(10, 3) == [4, 3, 3] and split(2, 4) == [1, 1, 0, 0]
    a = poisson_arrivals(200, 50.0, seed=1)
    assert a == poisson_arrivals(200, 50.0, seed=1) and a[0] == 0.0 and a == sorted(a)
    assert 2.0 < a[-1] < 6.0  # 199 gaps of mean 1/50 s
    assert poisson_arrivals(3, None, seed=1) == [0.0, 0.0, 0.0]
    t = Timing(0, start=1.0, chunk_times=[1.5, 1.6, 2.0, 2.1], chunk_tokens=[0, 1, 2, 1])
    assert t.first == 1.6 and t.num_tokens == 4
    assert t.inter_token_latencies() == pytest.approx([0.2, 0.2, 0.1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_bench_serving_sweep_from_client_processes(tmp_path):
    """Two gateways, two client processes, two rates: per-rate reports with exact token counts, the
    clients' own CPU, the table and the plot."""
    model = make_checkpoint(tmp_path / "m")
    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "bench", "serving", "--model", str(model), "--device", "cpu",
         "--num-prompts", "6", "--input-len", "8", "--output-len", "5", "--concurrency", "4",
         "--port", str(_free_port()), "--gateways", "2", "--client-processes", "2", "--request-rates", "40,inf",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [p["request_rate"] for p in report["sweep"]] == [40.0, None]
    assert report["request_rate"] is None  # the top-level figures are the all-at-once run's
    for point in report["sweep"]:
        assert point["requests"] == 6 and point["output_tokens"] == 30
        assert 0 < point["ttft_ms"]["p50"] <= point["ttft_ms"]["p99"] and point["itl_ms"]["p50"] > 0
        assert point["client_cores"] > 0 and {"client0", "client1", "gateway0", "gateway1"} <= set(point["processes"])
    assert "| 40/s |" in proc.stdout and "| all at once |" in proc.stdout
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("gateways", [1, 2])
def test_bench_gateway_prints_its_capacity(tmp_path, gateways):
    out = tmp_path / "gateway.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "bench", "gateway", "--streams", "8", "--gateways", str(gateways),
         "--client-processes", "2", "--max-tokens", "20", "--warmup", "1", "--duration", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"gateway capacity: [\d,]+ tokens/s \({gateways} gateways, 8 streams\)", last), last
    report = json.loads(out.read_text())
    assert report["tokens"] > 0 and report["responses"] > 0 and report["requests"] > 0
    assert report["checked"] > 0 and report["mismatches"] == 0  # every checked request's text was exact
    assert report["tokens_per_s"] == pytest.approx(report["tokens"] / 2)
    names = {f"gateway{i}" for i in range(gateways)} | {"engine", "client0", "client1"}
    assert names <= set(report["processes"])


def test_hf_baselines_can_run_on_the_first_prompts_only():
    from scheduler_svc.bench.throughput import _hf_subset

    work = make_workload(5, "3-9", "2-4", 1000, seed=0)
    sub = _hf_subset(work, 2)
    assert sub.prompts == work.prompts[:2] and sub.output_lens == work.output_lens[:2]
    assert _hf_subset(work, None) is work and _hf_subset(work, 5) is work


@pytest.mark.slow  # three services, one after another
def test_bench_serving_compares_routing_on_a_shared_prefix_workload(tmp_path):
    model = make_checkpoint(tmp_path / "m")
    out = tmp_path / "routing.json"
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler_svc.cli", "bench", "serving", "--model", str(model), "--device", "cpu",
         "--num-prompts", "8", "--prefix-groups", "2", "--prefix-len", "64", "--input-len", "4", "--output-len", "2",
         "--compare-routing", "--port", str(_free_port()), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report) == ["1 engine", "2 engines, prefix", "2 engines, round-robin"]
    one, prefix, rr = (report[k]["prefix_cache_hit_rate"] for k in report)
    assert all(r["requests"] == 8 and r["output_tokens"] == 16 for r in report.values())
    # Per group of 4: one engine computes the 64-token prefix once, round-robin on both engines.
    assert one == prefix == pytest.approx(3 * 64 / (8 * 68) * 2) and rr < one
    assert "prefix-cache hit rate" in proc.stdout and "round-robin" in proc.stdout
