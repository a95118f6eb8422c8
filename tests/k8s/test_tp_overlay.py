"""The tensor-parallel GPU overlay agrees with the code and with itself: the scheduler keeps the base's
arguments and waits for TENSOR_PARALLEL_SIZE ranks, the worker script starts one rank per GPU with the
base worker's settings (each command parses with the worker's parser), the GPU limit matches the size,
and NVLink multicast is off; rendered (tests/k8s/k8s_helpers.py), the engine pods hold it all."""

import re
import shlex

import pytest
import yaml

from tests.k8s.k8s_helpers import K8S, render

OVERLAY = K8S / "overlays" / "gpu-tp"


def _containers(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}


def _env() -> dict[str, str]:
    env = dict(yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())["data"])
    (generator,) = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())["configMapGenerator"]
    env |= dict(literal.split("=", 1) for literal in generator["literals"])
    return env


def _worker_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """The `pagedserve worker` command of each rank, as the shell would expand it."""
    (line,) = [x for x in script.replace("\\\n", " ").splitlines() if "pagedserve worker" in x]
    words = shlex.split(line.strip().removesuffix("&"))
    size = int(env["TENSOR_PARALLEL_SIZE"])
    return [[re.sub(r"\$(\w+)", lambda m, r=rank: str(r) if m.group(1) == "rank" else env[m.group(1)], w)
             for w in words] for rank in range(size)]


def test_scheduler_and_one_worker_per_gpu():
    from gpu_worker import worker
    from scheduler_svc import service

    env = _env()
    base = _containers(next(d for d in yaml.safe_load_all((K8S / "base" / "engine.yaml").read_text())
                            if d and d["kind"] == "StatefulSet"))
    tp = _containers(yaml.safe_load((OVERLAY / "tp.yaml").read_text()))
    assert tp["scheduler"]["args"] == base["scheduler"]["args"] + ["--tensor-parallel-size=$(TENSOR_PARALLEL_SIZE)"]
    env_and_pod = env | {"POD_NAME": "pagedserve-engine-0"}
    expand = [re.sub(r"\$\((\w+)\)", lambda m: env_and_pod[m.group(1)], a) for a in tp["scheduler"]["args"]]
    assert service.build_parser().parse_args(expand).tensor_parallel_size == int(env["TENSOR_PARALLEL_SIZE"]) == 2

    commands = _worker_commands(tp["worker"]["args"][0], env)
    base_flags = {a.split("=", 1)[0] for a in base["worker"]["args"]}
    for rank, command in enumerate(commands):
        assert command[:2] == ["pagedserve", "worker"]
        assert {a.split("=", 1)[0] for a in command[2:]} == base_flags | {"--rank", "--tensor-parallel-size"}
        args = worker.build_parser().parse_args(command[2:])
        assert (args.rank, args.tensor_parallel_size, args.device) == (rank, 2, f"cuda:{rank}")
        assert args.scheduler_address == next(a.split("=", 1)[1] for a in base["worker"]["args"]
                                              if a.startswith("--scheduler="))
    assert tp["worker"]["resources"]["limits"]["nvidia.com/gpu"] == int(env["TENSOR_PARALLEL_SIZE"])
    nvls = {e["name"]: e["value"] for e in tp["worker"]["env"]}
    assert nvls == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.slow  # runs kubectl
def test_overlay_renders():
    docs = render("gpu-tp")
    engine = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "pagedserve-engine")
    containers = _containers(engine)
    assert containers["scheduler"]["args"][-1] == "--tensor-parallel-size=$(TENSOR_PARALLEL_SIZE)"
    assert containers["worker"]["command"] == ["bash", "-c"]
    assert containers["worker"]["resources"]["limits"]["nvidia.com/gpu"] == 2
    volumes = {v["name"]: v for v in engine["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and "persistentVolumeClaim" in volumes["models"]
    assert {"name": "tmp", "mountPath": "/tmp"} in containers["worker"]["volumeMounts"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["DEVICE"] == "cuda" and config["TENSOR_PARALLEL_SIZE"] == "2"
