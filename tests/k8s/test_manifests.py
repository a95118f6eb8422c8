"""The Kubernetes base agrees with the code: every container's arguments parse with the role's own
parser, every $(VAR) comes from the ConfigMap or the container's env, addresses and ports line up (the
gateways find the engines through the headless Service), probes use gRPC health and `pagedserve probe`,
and the metrics ports match the scrape annotations and the metric names the code exports."""

import re

import yaml

from scheduler_svc import cli
from tests.k8s.k8s_helpers import K8S, containers, pod_spec


def load(path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_objects() -> dict[tuple[str, str], dict]:
    objs = {}
    for name in yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]:
        for doc in load(K8S / "base" / name):
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def workloads(objs) -> list[dict]:
    return [obj for (kind, _), obj in objs.items() if kind in ("Deployment", "StatefulSet")]


def all_containers(objs) -> dict[str, dict]:
    return {name: c for obj in workloads(objs) for name, c in containers(obj).items()}


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
    for c in all_containers(objs).values():
        assert c["command"][0] == "pagedserve" and c["image"] == "pagedserve"
        own = {e["name"]: "pod-name-0" for e in c.get("env", [])}
        used = {v for a in c["args"] for v in re.findall(r"\$\((\w+)\)", a)}
        assert used <= set(env) | set(own), f"{c['name']}: {used - set(env) - set(own)} not defined"
        role = c["command"][1]
        parsers[role]().parse_args(expand(c["args"], env | own))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = c.get(probe, {}).get("exec", {}).get("command")
            if command:
                assert command[:2] == ["pagedserve", "probe"]
                cli.build_parser().parse_args(command[1:])


def test_addresses_and_ports_line_up():
    objs = base_objects()
    c = all_containers(objs)
    engines = objs[("StatefulSet", "pagedserve-engine")]
    headless = objs[("Service", engines["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= engines["spec"]["template"]["metadata"]["labels"].items()
    (engine_port,) = headless["spec"]["ports"]
    assert flag(c["gateway"]["args"], "scheduler") == f"dns:{headless['metadata']['name']}:{engine_port['port']}"
    assert flag(c["scheduler"]["args"], "listen").endswith(f":{c['scheduler']['ports'][0]['containerPort']}")
    assert flag(c["scheduler"]["args"], "workers") == flag(c["worker"]["args"], "scheduler") == "tcp://127.0.0.1:5557"
    assert flag(c["scheduler"]["args"], "engine-name") == "$(POD_NAME)"
    (pod_name,) = c["scheduler"]["env"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    gateway_svc = objs[("Service", "pagedserve")]["spec"]["ports"][0]
    gateway_port = c["gateway"]["ports"][0]["containerPort"]
    assert flag(c["gateway"]["args"], "port") == str(gateway_port)
    assert c["gateway"]["readinessProbe"]["grpc"]["port"] == gateway_port
    assert gateway_svc["targetPort"] == engine_port["targetPort"] == "grpc"


def test_metrics_ports_match_the_scrape_annotations():
    from scheduler_svc import engine_metrics
    from scheduler_svc.gateway import metrics as gateway_metrics

    objs = base_objects()
    for obj in workloads(objs):
        annotations = obj["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        served = [c for c in containers(obj).values() if any(a.startswith("--metrics-port=") for a in c["args"])]
        assert len(served) == 1, obj["metadata"]["name"]  # one /metrics per pod
        (c,) = served
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert flag(c["args"], "metrics-port") == annotations["prometheus.io/port"] == str(ports["metrics"])
        # /metrics listens on loopback unless told otherwise; Prometheus scrapes the pod from outside it.
        assert flag(c["args"], "metrics-host") == "0.0.0.0", obj["metadata"]["name"]
    # The autoscaler's metric is one the scheduler exports.
    hpa = load(K8S / "overlays" / "gpu-autoscale" / "hpa.yaml")[0]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == engine_metrics._WAITING._name
    adapter = yaml.safe_load((K8S / "overlays" / "gpu-autoscale" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(engine_metrics._WAITING._name + "{")
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert gateway_metrics.ROUTED._name.startswith("pagedserve_")


def test_pods_run_restricted():
    for obj in workloads(base_objects()):
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"] for v in spec["volumes"]}
        for c in containers(obj).values():
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"] and "tmp" in volumes
