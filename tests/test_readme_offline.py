"""The README's Offline API example runs as written: the Python block under "## Offline API", taken from
README.md itself (not a copy), in a directory holding `out/smollm2`. There the test puts the small
random checkpoint rather than SmolLM2 (the same code path, minutes faster on a loaded 2-core box;
tests/e2e/test_gguf_matches_hf.py serves SmolLM2 itself, from `demo-model --trained` as make run does)."""

import os
import re
import subprocess
import sys

import pytest

from tests.factories import make_checkpoint
from tests.protos.proto_helpers import REPO

pytestmark = pytest.mark.slow  # starts an engine


def readme_blocks(heading: str, lang: str) -> list[str]:
    """The fenced ``lang`` blocks of README.md's section ``heading`` (up to the next heading of its level)."""
    text = (REPO / "README.md").read_text()
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    section = text[start:end if end != -1 else len(text)]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.DOTALL)


def test_offline_api_example_runs_verbatim(tmp_path):
    (example,) = readme_blocks("## Offline API", "python")
    assert 'LLM("out/smollm2"' in example  # the directory make run writes
    make_checkpoint(tmp_path / "out" / "smollm2")
    proc = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("[") and lines[-1].rstrip().endswith(("length", "stop"))
