"""The gateway process imports neither torch (nor transformers, which imports it) nor the scheduler core:
a fresh interpreter imports the gateway's entry point and builds what a gateway builds from a GGUF
checkpoint (its tokenizer and chat template), then lists its modules. The tokenizer it converted in a
child process gives transformers' ids."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gguf_files import TEXTS, Q, write_gguf

pytestmark = pytest.mark.slow  # two interpreters, one of them with torch

REPO = Path(__file__).resolve().parents[3]
# Standard library or prometheus-client, shared by the processes.
SCHEDULER_SVC = {"scheduler_svc", "scheduler_svc.block_hash", "scheduler_svc.finish_reason", "scheduler_svc.metrics"}
# No torch: logging, file names, sampling rules, the tokenizer's child process.
GPU_WORKER = {"gpu_worker", "gpu_worker.lifetime", "gpu_worker.log", "gpu_worker.model_files",
              "gpu_worker.sampling_params", "gpu_worker.gguf_tokenizer",
              "gpu_worker.constraint"}  # the output constraint record (json, re: no torch, no xgrammar)
CHILD = """
import json, sys
from scheduler_svc.gateway import server
from scheduler_svc.gateway.chat import ChatTemplate
from scheduler_svc.gateway.tokenizer import Tokenizer
server.build_parser().parse_args(["--model", sys.argv[1], "--scheduler", "127.0.0.1:1"])
tokenizer = Tokenizer(sys.argv[1])
ChatTemplate.from_model(sys.argv[1], tokenizer.id_to_token)
print(json.dumps({"modules": sorted(sys.modules), "ids": [tokenizer.encode(t) for t in json.loads(sys.argv[2])]}))
"""


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from tests.factories import make_checkpoint

    hf_dir = make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", intermediate_size=256)
    out = tmp_path_factory.mktemp("gguf") / "llama.gguf"
    write_gguf(hf_dir, out, lambda name: Q.F32, "llama")
    return out


def test_the_gateway_imports_neither_torch_nor_the_scheduler_core(gguf_file):
    out = subprocess.run([sys.executable, "-c", CHILD, str(gguf_file), json.dumps(TEXTS)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    modules = report["modules"]
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "transformers", "triton", "kernels")]
    assert not heavy, heavy[:10]
    ours = {m for m in modules if m.split(".")[0] == "scheduler_svc" and not m.startswith("scheduler_svc.gateway")}
    assert ours <= SCHEDULER_SVC, ours - SCHEDULER_SVC
    worker = {m for m in modules if m.split(".")[0] == "gpu_worker"}
    assert worker <= GPU_WORKER, worker - GPU_WORKER
    assert "scheduler_svc.gateway.server" in modules and "gpu_worker.gguf_tokenizer" in modules

    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert report["ids"] == [theirs.encode(t) for t in TEXTS]
