"""One tensor-parallel rank of tests/gpu_worker/test_model_sharding.py, run as a process (gloo, CPU):

    python -m tests.gpu_worker.tp_ranks RANK WORLD_SIZE INIT_METHOD OUT_DIR CASE=CHECKPOINT_DIR ...

For each checkpoint: loads this rank's shard (loader.load_model with a TPGroup), runs
tests.factories.run_mixed_steps over a KV pool of this rank's KV heads, and saves to
OUT_DIR/CASE.rankR.pt the tokens run, the logits (every rank has them all) and the bytes of its
parameters and of each parameter.
"""

import os
import sys

import torch

from gpu_worker.distributed import init_tensor_parallel, shutdown_tensor_parallel
from gpu_worker.loader import load_model
from tests.factories import run_mixed_steps


def main(argv: list[str]) -> None:
    rank, world_size, init_method, out_dir = int(argv[0]), int(argv[1]), argv[2], argv[3]
    torch.set_num_threads(1)
    tp = init_tensor_parallel(rank, world_size, init_method, torch.device("cpu"))
    for spec in argv[4:]:
        case, path = spec.split("=", 1)
        # A case named fp8_* quantizes its weights at load (a compressed-tensors checkpoint needs no flag).
        quantization = "fp8" if case.startswith("fp8_") else "none"
        model, config = load_model(path, torch.device("cpu"), torch.float32, tp=tp, quantization=quantization)
        computed, logits = run_mixed_steps(model, config.for_rank(world_size), 16)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
        torch.save({"computed": computed, "logits": logits, "bytes": num_bytes, "shapes": shapes},
                   f"{out_dir}/{case}.rank{rank}.pt")
    # Every rank done with the group, then leave it. CI saw both ranks of a run abort as they exited
    # ("terminate called without an active exception": a C++ destructor meeting a gloo thread still
    # joinable), their records already written; so the process ends without running destructors.
    torch.distributed.barrier()
    shutdown_tensor_parallel()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
