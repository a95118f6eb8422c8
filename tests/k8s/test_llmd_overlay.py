"""The llm-d overlay agrees with the code: the endpoint picker's metric flags name gauges the engines
export (the model-server protocol's types), it scrapes the port the schedulers serve metrics on, the
engines' KV events go to the port and topic the picker's config listens on, the InferencePool selects
the engine pods and targets their HTTP front, and every container's arguments parse with its role's
parser. Rendered with kustomize (tests/k8s/k8s_helpers.py)."""

import copy
import re

import pytest
import yaml
from prometheus_client import REGISTRY

import clients  # noqa: F401
from pagedserve.internal.v1 import scheduler_pb2
from tests.k8s.k8s_helpers import by_kind, containers, render

pytestmark = pytest.mark.slow  # runs kubectl

# The picker's flag -> the type the model-server protocol gives the metric.
METRIC_FLAGS = {"total-queued-requests-metric": "gauge", "total-running-requests-metric": "gauge",
                "kv-cache-usage-percentage-metric": "gauge", "cache-info-metric": "gauge"}


@pytest.fixture(scope="module")
def objs():
    return by_kind(render("llm-d"))


def flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args)


def expand(args: list[str], objs, **own: str) -> list[str]:
    """``args`` with $(VAR) taken from the rendered pagedserve ConfigMap and ``own`` (the pod's fields)."""
    (config,) = [d["data"] for (k, n), d in objs.items() if k == "ConfigMap" and n.startswith("pagedserve-config")]
    env = config | own
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def test_the_picker_reads_our_gauges_where_the_schedulers_serve_them(objs):
    from scheduler_svc import engine_metrics as metrics

    metrics.EngineMetrics("m", "llmd-test", 16).update(scheduler_pb2.EngineLoad(num_free_blocks=3, num_blocks=4))
    types = {m.name: m.type for m in REGISTRY.collect()}
    epp = flags(containers(objs[("Deployment", "pagedserve-epp")])["epp"]["args"])
    for flag, kind in METRIC_FLAGS.items():
        assert types.get(epp[flag]) == kind, (flag, epp[flag])
    assert epp["lora-info-metric"] == ""  # no adapters: the picker scrapes no LoRA metric
    scheduler = flags(containers(objs[("StatefulSet", "pagedserve-engine")])["scheduler"]["args"])
    assert epp["model-server-metrics-port"] == scheduler["metrics-port"]
    assert epp["model-server-metrics-path"] == "/metrics"
    assert (epp["pool-name"], epp["grpc-port"]) == (objs[("InferencePool", "pagedserve")]["metadata"]["name"], "9002")


def test_kv_events_reach_the_pickers_index(objs):
    engines = objs[("StatefulSet", "pagedserve-engine")]
    scheduler = flags(containers(engines)["scheduler"]["args"])
    m = re.fullmatch(r"tcp://([\w-]+):(\d+)", scheduler["kv-events-endpoint"])
    assert m, "the engines connect (the picker binds)"
    service = objs[("Service", m.group(1))]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == int(m.group(2))]
    epp = objs[("Deployment", "pagedserve-epp")]
    (target,) = [p for p in containers(epp)["epp"]["ports"] if p["name"] == port["targetPort"]]
    config = yaml.safe_load(objs[("ConfigMap", "pagedserve-epp")]["data"]["epp-config.yaml"])
    (scorer,) = [p for p in config["plugins"] if p["type"] == "precise-prefix-cache-scorer"]
    events = scorer["parameters"]["kvEventsConfig"]
    assert events["zmqEndpoint"] == f"tcp://*:{target['containerPort']}"
    assert scheduler["kv-events-topic"].startswith(events["topicFilter"])
    assert scheduler["kv-events-topic"] == "kv@$(POD_IP)@$(MODEL_NAME)"  # llm-d reads the pod from the topic
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in containers(engines)["scheduler"]["env"]}
    assert env["POD_IP"] == "status.podIP"
    (block_size,) = [d["data"]["BLOCK_SIZE"] for (k, n), d in objs.items() if k == "ConfigMap"
                     and n.startswith("pagedserve-config")]
    assert scorer["parameters"]["tokenProcessorConfig"]["blockSize"] == int(block_size)
    profile = {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]}
    assert {"precise-prefix-cache-scorer", "kv-cache-utilization-scorer", "queue-scorer"} <= profile


def test_the_pool_selects_the_engines_and_targets_their_http_front(objs):
    from scheduler_svc.gateway import server as gateway

    pool = objs[("InferencePool", "pagedserve")]["spec"]
    engines = objs[("StatefulSet", "pagedserve-engine")]
    labels = engines["spec"]["template"]["metadata"]["labels"]
    assert pool["selector"]["matchLabels"].items() <= labels.items()
    http = containers(engines)["http"]
    (port,) = http["ports"]
    assert pool["targetPorts"] == [{"number": port["containerPort"]}]
    args = gateway.build_parser().parse_args(expand(http["args"], objs))
    assert args.http_port == port["containerPort"] and args.scheduler == "127.0.0.1:50052"
    picker = objs[("Service", pool["endpointPickerRef"]["name"])]
    assert pool["endpointPickerRef"]["port"]["number"] in [p["port"] for p in picker["spec"]["ports"]]


def test_the_scheduler_arguments_parse(objs):
    from scheduler_svc import service

    scheduler = containers(objs[("StatefulSet", "pagedserve-engine")])["scheduler"]
    args = service.build_parser().parse_args(expand(scheduler["args"], objs, POD_NAME="e-0", POD_IP="10.1.2.3"))
    assert (args.kv_events_endpoint, args.kv_events_topic) == ("tcp://pagedserve-epp:5557", "kv@10.1.2.3@model")


def test_the_inferencepool_schema_refuses_what_the_crd_refuses(objs):
    import jsonschema

    from tests.k8s.test_rendered import validate_custom

    pool = objs[("InferencePool", "pagedserve")]
    validate_custom(pool)
    for path, value in ((("spec", "targetPorts"), []), (("spec", "extra"), 1),
                        (("spec", "endpointPickerRef", "failureMode"), "Sometimes"),
                        (("spec", "targetPorts", 0, "number"), 70000)):
        broken = copy.deepcopy(pool)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_custom(broken)
