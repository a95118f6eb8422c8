"""The Kubernetes manifests agree with the code: every container's arguments parse with the role's own
parser, every $(VAR) is in the ConfigMap, addresses and ports line up, probes use gRPC health and
`pagedserve probe`; with kubectl present, both overlays render."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from scheduler_svc import cli

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ("cpu-demo", "gpu")


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_objects() -> dict[tuple[str, str], dict]:
    objs = {}
    for name in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]:
        for doc in load(K8S / "base" / name):
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def containers(objs) -> dict[str, dict]:
    return {
        c["name"]: c
        for (kind, _), obj in objs.items() if kind == "Deployment"
        for c in obj["spec"]["template"]["spec"]["containers"]
    }


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def test_container_arguments_parse_with_the_roles_parsers():
    from gpu_worker import worker
    from scheduler_svc import service
    from scheduler_svc.gateway import server as gateway

    objs = base_objects()
    env = objs[("ConfigMap", "pagedserve-config")]["data"]
    parsers = {"gateway": gateway.build_parser, "scheduler": service.build_parser, "worker": worker.build_parser}
    for c in containers(objs).values():
        assert c["command"][0] == "pagedserve" and c["image"] == "pagedserve"
        used = {v for a in c["args"] for v in re.findall(r"\$\((\w+)\)", a)}
        assert used <= set(env), f"{c['name']}: {used - set(env)} not in the ConfigMap"
        role = c["command"][1]
        parsers[role]().parse_args(expand(c["args"], env))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = c.get(probe, {}).get("exec", {}).get("command")
            if command:
                assert command[:2] == ["pagedserve", "probe"]
                cli.build_parser().parse_args(command[1:])


def test_addresses_and_ports_line_up():
    objs = base_objects()
    c = containers(objs)
    scheduler_svc = objs[("Service", "pagedserve-scheduler")]["spec"]["ports"][0]
    gateway_svc = objs[("Service", "pagedserve")]["spec"]["ports"][0]
    assert flag(c["gateway"]["args"], "scheduler") == f"pagedserve-scheduler:{scheduler_svc['port']}"
    assert flag(c["scheduler"]["args"], "listen").endswith(f":{c['scheduler']['ports'][0]['containerPort']}")
    assert flag(c["scheduler"]["args"], "workers") == flag(c["worker"]["args"], "scheduler")
    gateway_port = c["gateway"]["ports"][0]["containerPort"]
    assert flag(c["gateway"]["args"], "port") == str(gateway_port)
    assert c["gateway"]["readinessProbe"]["grpc"]["port"] == gateway_port
    assert gateway_svc["targetPort"] == scheduler_svc["targetPort"] == "grpc"


@pytest.mark.slow  # runs kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render(overlay):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not found")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 2 and kinds.count("Service") == 2
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    for d in docs:
        if d["kind"] == "Deployment":
            (volume,) = d["spec"]["template"]["spec"]["volumes"]
            assert len(set(volume) - {"name"}) == 1, volume  # one source per volume
    assert config["DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")
