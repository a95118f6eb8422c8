"""The benchmark commands end to end on CPU at toy sizes (their figures matter on a GPU; here the
plumbing, the accounting and the report format are checked)."""

import json
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
