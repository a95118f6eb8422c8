"""The GPU round collects on the GPU image (issue 22): with the dev-only packages it lacks made
unimportable (tests/gpu_image_imports.py), ``pytest -m gpu --collect-only`` has no error and finds the
GPU tests."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_the_gpu_round_collects_without_the_dev_only_packages():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
         "-o", "addopts=", "-p", "tests.gpu_image_imports", "tests"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "error" not in out.lower().split("warnings summary")[0], out[-4000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(collected) >= 150, out[-2000:]  # 174 GPU tests at the time of writing


def test_the_blocker_blocks():
    code = ("import tests.gpu_image_imports as g; g.pytest_configure(None)\n"
            "try:\n import cryptography\nexcept ModuleNotFoundError as e:\n print('blocked', e)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    want = "blocked No module named 'cryptography': it is not on the GPU image"
    assert proc.stdout.startswith(want), proc.stdout + proc.stderr
