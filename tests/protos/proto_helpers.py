"""Helpers of the contract tests: the repository root, tool checks, the GOPATH environment."""

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Debian installs the Go sources of its golang-*-dev packages here; our stubs come first in GOPATH.
DEBIAN_GOCODE = Path("/usr/share/gocode")
GOPATH = f"{REPO / 'clients' / 'go'}:{DEBIAN_GOCODE}"
GO_PACKAGES = ("golang-go golang-google-grpc-dev golang-google-protobuf-dev "
               "golang-github-golang-protobuf-1-5-dev")


def require(missing: list[str], install: str) -> None:
    """Skip when tools are missing, but fail in CI (CI=true), which installs them: a skip there
    would hide a broken install behind a green run."""
    if not missing:
        return
    reason = f"{', '.join(missing)} not found (apt-get install {install})"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def go_env(tmp_path: Path) -> dict[str, str]:
    """Environment for `go` in GOPATH mode against Debian's packages. cgo is off: everything here is
    pure Go, and CI installs golang-go without its recommended gcc."""
    env = dict(os.environ, GO111MODULE="off", GOFLAGS="", GOPATH=GOPATH, CGO_ENABLED="0")
    if not any(k in env for k in ("GOCACHE", "HOME", "XDG_CACHE_HOME")):
        env["GOCACHE"] = str(tmp_path / "gocache")
    return env


def require_go() -> None:
    """Skip (fail in CI) unless `go` and Debian's gRPC sources are installed."""
    missing = [] if shutil.which("go") else ["go"]
    if not (DEBIAN_GOCODE / "src" / "google.golang.org" / "grpc").is_dir():
        missing.append(f"{DEBIAN_GOCODE}/src/google.golang.org/grpc")
    require(missing, GO_PACKAGES)
