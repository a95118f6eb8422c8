"""Shared by the manifest tests: where the manifests are, and rendering an overlay with kustomize.

Rendering uses `kubectl kustomize` (PAGEDSERVE_KUBECTL names another kubectl). CI installs Debian's
kubernetes-client (kubectl 1.20, kustomize 2.0.3); the kustomizations keep to the fields that version
reads, and a newer kubectl renders them alike. Without kubectl the rendering tests skip, except in CI
(CI=true), where they fail.
"""

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.protos.proto_helpers import require

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("cpu-demo", "gpu", "gpu-tp", "gpu-autoscale", "llm-d")


def kubectl() -> str:
    path = os.environ.get("PAGEDSERVE_KUBECTL") or shutil.which("kubectl")
    require([] if path else ["kubectl"], "kubernetes-client")
    return path


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict, init: bool = False) -> dict[str, dict]:
    spec = pod_spec(obj)
    return {c["name"]: c for c in spec["containers"] + (spec.get("initContainers", []) if init else [])}
