"""The worker's step profiler: window parsing, step classification, the window bookkeeping and the
summary arithmetic (the torch.profiler part runs on a GPU: bench throughput --profile-steps)."""

import pytest

import clients  # noqa: F401 (puts the generated stubs on the path)
from gpu_worker import step_profile
from gpu_worker.step_profile import StepProfiler, Window, parse_windows, step_kind, summarize
from pagedserve.internal.v1 import worker_pb2


def test_parse_windows():
    assert parse_windows("decode:100:10, prefill:20:2") == [Window("decode", 100, 10), Window("prefill", 20, 2)]
    for bad in ("decode:1", "mixed:1:2", "decode:-1:2", "decode:1:0", "decode:a:2"):
        with pytest.raises(ValueError, match="KIND:SKIP:COUNT"):
            parse_windows(bad)


def test_step_kind():
    decode = worker_pb2.StepPlan(running_seq_ids=[1, 2], running_num_scheduled_tokens=[1, 1])
    chunk = worker_pb2.StepPlan(running_seq_ids=[1, 2], running_num_scheduled_tokens=[1, 64])
    new = worker_pb2.StepPlan(new_seqs=[worker_pb2.NewSequence(seq_id=3, num_scheduled_tokens=1)])
    assert [step_kind(p) for p in (decode, chunk, new)] == ["decode", "prefill", "prefill"]


def test_summarize():
    kernels = [("_paged_attention_kernel", 300.0), ("nvjet_tst_128x256_gemm", 500.0),
               ("_paged_attention_kernel", 100.0), ("void at::native::elementwise_kernel<...>", 20.0),
               ("mystery", 80.0)]
    s = summarize(kernels, wall_us=2000.0, window=Window("decode", 5, 2))
    assert s["wall_ms_per_step"] == pytest.approx(1.0)
    assert s["kernel_ms_per_step"] == pytest.approx(0.5)
    assert s["device_busy_pct"] == pytest.approx(50.0)
    assert s["categories_ms_per_step"] == pytest.approx(
        {"gemm": 0.25, "attention": 0.2, "other": 0.04, "elementwise": 0.01})
    assert s["top_kernels"][0]["name"].startswith("nvjet") and s["top_kernels"][1]["calls_per_step"] == 1.0
    assert "50.0% busy" in step_profile.format_summary(s)


def test_windows_open_and_close_on_their_steps(monkeypatch, tmp_path):
    """decode:2:3 profiles decode steps 3-5; a prefill step in between closes the window early."""
    events = []
    prof = StepProfiler(parse_windows("decode:2:3,prefill:1:1"), str(tmp_path / "p.jsonl"))
    monkeypatch.setattr(prof, "_start", lambda w: (events.append(("start", w.kind, prof.seen[w.kind])),
                                                   setattr(prof, "active", w), setattr(prof, "in_window", 0)))
    monkeypatch.setattr(prof, "_stop", lambda: (events.append(("stop", prof.active.kind, prof.in_window)),
                                                setattr(prof, "active", None)))
    decode = worker_pb2.StepPlan(running_seq_ids=[1], running_num_scheduled_tokens=[1])
    prefill = worker_pb2.StepPlan(running_seq_ids=[1], running_num_scheduled_tokens=[8])
    for plan in [prefill, decode, decode, decode, decode, decode, decode, prefill, prefill, decode]:
        prof.observe(plan)
    prof.close()
    assert events == [("start", "decode", 3), ("stop", "decode", 3), ("start", "prefill", 2), ("stop", "prefill", 1)]


def test_from_env(monkeypatch):
    monkeypatch.delenv(step_profile.ENV_STEPS, raising=False)
    assert StepProfiler.from_env() is None
    monkeypatch.setenv(step_profile.ENV_STEPS, "decode:1:1")
    monkeypatch.delenv(step_profile.ENV_OUT, raising=False)
    with pytest.raises(ValueError, match=step_profile.ENV_OUT):
        StepProfiler.from_env()
