"""fp32 linears on CPU through oneDNN, with weights reordered once into its blocked layout.

torch's F.linear on CPU is MKL's sgemm, which at the few rows of a decode step (M = 1-32 tokens) is far
from the memory bandwidth that reading the weights needs: on the 2-core EPYC of BENCHMARKS.md, one core
reads 22 GB/s but sgemm streams the weights at 7 GB/s at M = 8. oneDNN's inner product on a prepacked
weight (``mkldnn::_linear_pointwise``, what torch's own compiler emits for CPU linears) is 1.3-1.7x
faster at M = 1-32 and ~1.1x at prefill sizes, and a SmolLM2-135M decode step of 8 sequences drops from
114 to 73 ms. The math is the same fp32 product; results differ from MKL's in rounding only.

``pack_linears`` swaps every fp32 nn.Linear of a CPU model (row-parallel ones included) for a
PackedLinear holding the packed weight; the unpacked weight is dropped unless something else holds it
(an LM head tied to the embedding packs a copy). Without a oneDNN build it changes nothing.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from gpu_worker.models.parallel import SINGLE, RowParallelLinear, TPGroup


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build packs and runs linears through oneDNN on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(4, 8)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), torch.ops.mkldnn._reorder_linear_weight(w, None),
                                                  None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return bool((out == 8).all())


class PackedLinear(nn.Module):
    """y = x @ W^T + b with W in oneDNN's layout; as the row-parallel linear it replaces, a rank's partial
    product is summed over the ranks before the bias is added."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias
        self.tp: TPGroup = linear.tp if isinstance(linear, RowParallelLinear) else SINGLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in_features] -> [T, out_features]
        if self.tp.world_size == 1:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        out = self.tp.all_reduce(torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], ""))
        return out if self.bias is None else out + self.bias


def pack_linears(model: nn.Module) -> int:
    """Swaps the fp32 CPU nn.Linear modules of ``model`` for PackedLinear; returns how many."""
    if not onednn_available():
        return 0
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
             and child.weight.dtype == torch.float32]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)
