"""The checked-in stubs under clients/ are exactly what protos/generate.sh makes from protos/."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from proto_helpers import REPO, require

pytestmark = pytest.mark.slow  # generate.sh runs protoc

# Generated files by language: generate.sh deletes and rewrites these patterns only, so hand-written
# files beside them (the Python client library, the Go example) are not compared.
PATTERNS = {
    "python": ("python", ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")),
    "go": ("go/src", ("*.pb.go",)),
}


def generated_files(root: Path, lang: str) -> dict[str, bytes]:
    subdir, patterns = PATTERNS[lang]
    base = root / subdir
    return {
        str(p.relative_to(base)): p.read_bytes()
        for pattern in patterns
        for p in base.rglob(pattern)
    }


def generate(out: Path, lang: str) -> None:
    env = dict(os.environ, PY=sys.executable, LANGS=lang)
    subprocess.run(["bash", "protos/generate.sh", str(out)], cwd=REPO, env=env, check=True)


def assert_fresh(tmp_path: Path, lang: str) -> None:
    generate(tmp_path, lang)
    fresh = generated_files(tmp_path, lang)
    checked_in = generated_files(REPO / "clients", lang)
    assert fresh, f"generate.sh made no {lang} stubs"
    assert sorted(checked_in) == sorted(fresh), "stale or missing stubs: run `make proto`"
    stale = [name for name in fresh if checked_in[name] != fresh[name]]
    assert not stale, f"stubs differ from a fresh generation, run `make proto`: {stale}"


def test_python_stubs_are_fresh(tmp_path):
    assert_fresh(tmp_path, "python")


def test_go_stubs_are_fresh(tmp_path):
    tools = ("protoc", "protoc-gen-go", "protoc-gen-go-grpc")
    missing = [t for t in tools if shutil.which(t) is None]
    require(missing, "protobuf-compiler protoc-gen-go protoc-gen-go-grpc")
    assert_fresh(tmp_path, "go")


def test_generation_is_deterministic(tmp_path):
    generate(tmp_path / "a", "python")
    generate(tmp_path / "b", "python")
    assert generated_files(tmp_path / "a", "python") == generated_files(tmp_path / "b", "python")


def test_go_stubs_cover_the_public_api_only():
    """No Go code speaks the internal protocols, so generate.sh makes Go stubs for pagedserve/v1 alone
    (checked without the Go tools, which the freshness test needs)."""
    go = generated_files(REPO / "clients", "go")
    public = (REPO / "protos" / "pagedserve" / "v1").glob("*.proto")
    assert go and all(name.startswith("pagedserve/v1/") for name in go), sorted(go)
    assert {f"pagedserve/v1/{p.stem}.pb.go" for p in public} <= set(go)
