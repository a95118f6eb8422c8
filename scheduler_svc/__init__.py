"""pagedserve's scheduler side: gateway, scheduler, block pool and KV cache manager, CLI, launcher."""

import clients  # noqa: F401  (generated stubs on sys.path)
from gpu_worker.sampling_params import InvalidField, SamplingParams


def __getattr__(name: str):
    # LLM pulls in grpc and process management; load it only when asked for.
    if name == "LLM":
        from scheduler_svc.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "InvalidField", "SamplingParams"]
