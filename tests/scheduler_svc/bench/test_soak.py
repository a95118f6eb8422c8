"""``bench soak``: a bounded run through a real service (mixed good and bad requests, then no block or
request left and the gateway's memory flat), and the verdict's rules on made-up reports."""

from collections import Counter

import pytest

from scheduler_svc.bench.soak import KINDS, SoakReport, failures, run_soak
from tests.factories import make_checkpoint


@pytest.mark.slow  # ~60 s: 8 streams for 40 s after the service starts
def test_a_soak_leaves_nothing_behind(tmp_path):
    model = make_checkpoint(tmp_path / "llama", max_position_embeddings=512)
    report = run_soak(model, streams=8, seconds=40, seed=1, serve_args=("--kv-cache-memory", "16MiB"),
                      log_dir=tmp_path / "logs")
    summary = report.as_dict()
    assert failures(report, max_rss_growth_mib=64.0) == [], summary
    assert set(report.by_kind()) == set(KINDS) and sum(report.outcomes.values()) > 100, summary
    assert (report.leaked_blocks, report.requests_left, report.unexpected) == (0, 0, []), summary
    assert report.outcomes[("deadline", "DEADLINE_EXCEEDED")] and report.outcomes[("bad", "INVALID_ARGUMENT")]


def test_the_verdict_names_each_failure():
    good = SoakReport(seconds=60, outcomes=Counter({(k, "x"): 1 for k in KINDS}),
                      rss_mib={"gateway": {"start": 50.0, "warm": 60.0, "end": 70.0}})
    assert failures(good, max_rss_growth_mib=20) == []
    bad = SoakReport(seconds=60, outcomes=Counter({("normal", "length"): 3}), unexpected=["bad: OK"],
                     leaked_blocks=2, requests_left=1, rss_mib={"gateway": {"start": 50.0, "warm": 60.0, "end": 200.0}})
    reasons = failures(bad, max_rss_growth_mib=20)
    assert len(reasons) == 4
    assert reasons[0].startswith("1 unexpected outcomes") and "2 KV blocks and 1 requests left" in reasons[1]
    assert "grew by 140.0 MiB after warm-up" in reasons[2] and "no request of kind" in reasons[3]
