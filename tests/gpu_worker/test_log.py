"""One logger for every process: each role configures gpu_worker.log under its own component, lines are
JSON when stderr is not a terminal and console key=value when it is, and a line about a request carries
its request_id. Each case runs in a fresh interpreter (structlog's configuration is process-wide)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import sys
from gpu_worker import log
log.configure(sys.argv[1], "info", sys.argv[2])
logger = log.get_logger()
logger.info("model loaded", rank=0)
logger.bind(request_id="r-7").warning("request failed", error="boom")
logger.debug("not shown at info")
"""


def run(component: str, fmt: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHILD, component, fmt], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""  # logs go to stderr
    return out.stderr.splitlines()


@pytest.mark.parametrize("component", ["gateway", "scheduler", "worker", "launcher"])
def test_json_lines_carry_the_component_and_the_request_id(component):
    lines = [json.loads(line) for line in run(component, "auto")]  # stderr is a pipe here: JSON
    assert [(d["event"], d["level"], d["component"]) for d in lines] == [
        ("model loaded", "info", component), ("request failed", "warning", component)]
    assert lines[0]["rank"] == 0 and "request_id" not in lines[0]
    assert (lines[1]["request_id"], lines[1]["error"]) == ("r-7", "boom")


def test_console_format_is_key_value():
    (first, second) = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in run("worker", "console")]  # no colours
    assert "model loaded" in first and "component=worker" in first and not first.startswith("{")
    assert "request_id=r-7" in second


@pytest.mark.parametrize("role", ["gateway", "scheduler", "worker"])
def test_every_role_takes_the_logging_flags(role):
    from gpu_worker import worker
    from scheduler_svc import service
    from scheduler_svc.gateway import server

    parser = {"gateway": server.build_parser, "scheduler": service.build_parser, "worker": worker.build_parser}[role]()
    required = {"gateway": ["--model", "m", "--scheduler", "x"], "scheduler": [],
                "worker": ["--model", "m", "--scheduler", "x"]}[role]
    args = parser.parse_args([*required, "--log-level", "debug", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("debug", "json")
