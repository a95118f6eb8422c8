"""Every overlay renders with kustomize, and every object it renders is valid against Kubernetes' JSON
schemas (kubernetes-validate's, strict: unknown fields fail) for the oldest and the newest version it
ships, and a custom resource against its own schema (tests/k8s/schemas: kubernetes-validate has none);
the rendered fleet holds together: the ConfigMap the containers read, images, the engines' discovery,
disruption budgets, network policies, and (gpu-autoscale) the autoscaler."""

import json
from pathlib import Path

import pytest

from tests.k8s.k8s_helpers import OVERLAYS, by_kind, containers, pod_spec, render

pytestmark = pytest.mark.slow  # runs kubectl

IMAGES = {"cpu-demo": "pagedserve:0.1.0", "gpu": "pagedserve-cuda:0.1.0", "gpu-tp": "pagedserve-cuda:0.1.0",
          "gpu-autoscale": "pagedserve-cuda:0.1.0", "llm-d": "pagedserve-cuda:0.1.0"}
# Custom resources: (apiVersion, kind) -> their schema.
CUSTOM_SCHEMAS = {("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.json"}


def validate_custom(doc: dict) -> None:
    import jsonschema

    name = CUSTOM_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    schema = json.loads((Path(__file__).parent / "schemas" / name).read_text())
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def schema_versions() -> tuple[str, str]:
    from kubernetes_validate import utils

    versions = utils.all_versions()
    return versions[0], versions[-1]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


def test_objects_are_valid_against_the_schemas(rendered):
    import kubernetes_validate

    overlay, docs = rendered
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_SCHEMAS:
            validate_custom(doc)
    docs = [d for d in docs if (d["apiVersion"], d["kind"]) not in CUSTOM_SCHEMAS]
    for version in schema_versions():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): "
                            f"{'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_fleet_holds_together(rendered):
    overlay, docs = rendered
    objs = by_kind(docs)
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("pagedserve-config")]
    assert config["metadata"]["name"] == "pagedserve-config"
    engines, gateways = objs[("StatefulSet", "pagedserve-engine")], objs[("Deployment", "pagedserve-gateway")]
    for obj in (engines, gateways):
        spec = pod_spec(obj)
        for c in containers(obj, init=True).values():
            assert c["image"] == IMAGES[overlay], (overlay, c["name"])
            refs = [e["configMapRef"]["name"] for e in c.get("envFrom", [])]
            assert refs in ([], [config["metadata"]["name"]])
        for volume in spec["volumes"]:
            assert len(set(volume) - {"name"}) == 1, volume  # one source per volume
    assert config["data"]["DEVICE"] == ("cpu" if overlay == "cpu-demo" else "cuda")
    headless = objs[("Service", engines["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    gateway_args = containers(gateways)["gateway"]["args"]
    assert f"--scheduler=dns:{headless['metadata']['name']}:{headless['spec']['ports'][0]['port']}" in gateway_args
    for name in ("pagedserve-engine", "pagedserve-gateway"):
        assert objs[("PodDisruptionBudget", name)]["spec"]["maxUnavailable"] == 1
    _check_network_policies(objs, overlay)
    if overlay == "gpu-autoscale":
        hpa = objs[("HorizontalPodAutoscaler", "pagedserve-engine")]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                 "name": "pagedserve-engine"}
        assert "replicas" not in engines["spec"]  # the autoscaler's to set
    else:
        assert engines["spec"]["replicas"] == 2
    assert gateways["spec"]["replicas"] == (1 if overlay == "cpu-demo" else 2)
    if overlay.startswith("gpu"):
        gpus = containers(engines)["worker"]["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == int(config["data"].get("TENSOR_PARALLEL_SIZE", 1))


def _check_network_policies(objs, overlay: str) -> None:
    """The scheduler's port is open to gateways only; nothing opens the workers' ZeroMQ port. With llm-d,
    the HTTP front is open too and the engines reach the endpoint picker's KV-event port (and DNS) only."""
    engine = objs[("NetworkPolicy", "pagedserve-engine")]["spec"]
    assert engine["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pagedserve-engine"}
    grpc_rules = [r for r in engine["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]]
    (rule,) = grpc_rules
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pagedserve-gateway"}}}]
    open_ports = ["metrics", "http"] if overlay == "llm-d" else ["metrics"]
    assert [r["ports"] for r in engine["ingress"] if r is not rule] == [
        [{"port": p, "protocol": "TCP"}] for p in open_ports]
    assert set(engine["policyTypes"]) == {"Ingress", "Egress"}
    if overlay == "llm-d":
        epp, dns = engine["egress"]
        assert epp == {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pagedserve-epp"}}}],
                       "ports": [{"port": 5557, "protocol": "TCP"}]}
        assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
        assert "5557" not in str(engine["ingress"])  # the workers' port stays closed
    else:
        assert engine["egress"] == []
    gateway = objs[("NetworkPolicy", "pagedserve-gateway")]["spec"]
    to_engines = [r for r in gateway["egress"] if r["to"][0].get("podSelector", {}).get("matchLabels", {}).get(
        "app.kubernetes.io/name") == "pagedserve-engine"]
    assert [r["ports"] for r in to_engines] == [[{"port": 50052, "protocol": "TCP"}]]
    ports = str([engine["ingress"], gateway] if overlay == "llm-d" else [engine, gateway])
    assert "5557" not in ports and "5558" not in ports
