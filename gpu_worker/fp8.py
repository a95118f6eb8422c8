"""FP8 (e4m3) linear layers: weights quantized per output channel, activations per token at run time.

``Fp8Linear`` holds ``weight`` [out, in] in float8_e4m3fn and ``weight_scale`` [out] fp32, the weight
being W / scale with scale = max(|W[o, :]|) / 448 per output row. On CUDA its product is one
``torch._scaled_mm`` with row-wise scales (the activations' per-token scales from kernels/quant_fp8.py,
or from kernels/silu_mul_quant.py for an MLP's down projection), bf16 out (kernels/fp8_gemv.py computes the same
product for up to 16 tokens; off until timed, see GEMV_MAX_M); elsewhere it is emulated: the
same quantized values, dequantized, in an fp32 product, so the CPU tests exercise the same numbers.

Where the fp8 weights come from (gpu_worker/loader.py):
- ``--quantization fp8``: the checkpoint loads in the serving dtype, then ``quantize_linears`` swaps each
  linear (the LM head only with ``--fp8-lm-head``; embeddings and norms stay) for an Fp8Linear.
- a compressed-tensors FP8 checkpoint (llm-compressor's layout, ``fp8_scheme``): the linears are swapped
  before loading and read ``weight`` (e4m3) and ``weight_scale`` (per channel or per tensor) as stored.

Tensor parallelism: a column-parallel linear's rows and their scales are this rank's; a row-parallel
linear holds its columns of the weight and every row's scale. Quantizing at load, the row-parallel
ranks agree on each row's absolute max (an all-reduce of the maxima), so the scales, and the values,
are those of the unsharded model.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from gpu_worker.models.parallel import SINGLE, RowParallelLinear, TPGroup
from kernels.fp8_gemv import fp8_gemv
from kernels.quant_fp8 import FP8_MAX, quantize_per_token

FP8 = torch.float8_e4m3fn
# Up to this many tokens the product would run in kernels/fp8_gemv.py (a bandwidth-bound weight stream),
# above it in torch._scaled_mm (cuBLASLt); both compute the same row-wise-scaled product. 0 (the default)
# until the kernel has been timed on a GPU: `python -m scheduler_svc.bench.fp8_parts` compares the two at M = 1,
# and 16 turns it on (BENCHMARKS.md, issue 25).
GEMV_MAX_M = 0


def weight_scales(w: torch.Tensor, tp: TPGroup = SINGLE, row_parallel: bool = False) -> torch.Tensor:
    """Per-output-row scales [out] fp32 of ``w`` [out, in]: max |row| / 448, the maxima of a row-parallel
    linear's column shards joined over the ranks."""
    amax = w.float().abs().amax(dim=1)
    if row_parallel and tp.world_size > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX)
    return (amax / FP8_MAX).clamp_min(1e-12)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W / scale per row, saturated and rounded to e4m3."""
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class Fp8Linear(nn.Module):
    """y = (x quantized per token) @ (W quantized per channel)^T + b; a row-parallel one sums its
    partial products over the ranks before the bias."""

    # materialize() gives these parameters their own dtypes, not the serving dtype (loader.py).
    param_dtypes = {"weight": FP8, "weight_scale": torch.float32}

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup = SINGLE,
                 out_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=out_dtype), requires_grad=False) if bias else None
        self._dequantized: torch.Tensor | None = None  # CPU emulation: W, dequantized once

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        tp = linear.tp if isinstance(linear, RowParallelLinear) else SINGLE
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, tp, w.dtype)
        scale = weight_scales(w, tp, isinstance(linear, RowParallelLinear))
        new.weight = nn.Parameter(quantize_weight(w, scale), requires_grad=False)
        new.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out], x's dtype
        xq, xs = quantize_per_token(x.reshape(-1, x.shape[-1]))
        return self.forward_quantized(xq, xs, x.dtype).view(*x.shape[:-1], self.out_features)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The product from an input already quantized per token: xq [T, in] e4m3, xs [T, 1] fp32."""
        if xq.is_cuda and xq.shape[0] <= GEMV_MAX_M:  # decode batches: a weight-streaming kernel
            out = fp8_gemv(xq, xs, self.weight, self.weight_scale, dtype)
        elif xq.is_cuda:
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale[None, :],
                                   out_dtype=dtype)
        else:
            if self._dequantized is None or self._dequantized.dtype != torch.float32:
                self._dequantized = self.weight.float() * self.weight_scale[:, None]
            out = ((xq.float() * xs) @ self._dequantized.t()).to(dtype)
        if self.tp.world_size > 1:
            out = self.tp.all_reduce(out)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3, per-channel"


def _linears(model: nn.Module, lm_head: bool) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and (lm_head or name != "lm_head")]


def quantize_linears(model: nn.Module, lm_head: bool = False) -> int:
    """Swaps the linears of a loaded model for Fp8Linear, quantizing their weights; returns how many.
    The LM head is kept unless ``lm_head`` (a tied head is quantized as a copy; the embedding stays)."""
    swaps = _linears(model, lm_head)
    for parent, name, child in swaps:
        setattr(parent, name, Fp8Linear.from_linear(child))
    return len(swaps)


def prepare_fp8_checkpoint(model: nn.Module, lm_head: bool) -> int:
    """Before loading a pre-quantized checkpoint into a meta-device model: swaps its linears for empty
    Fp8Linear (the LM head only if the checkpoint quantized it); returns how many."""
    swaps = _linears(model, lm_head)
    for parent, name, child in swaps:
        tp = child.tp if isinstance(child, RowParallelLinear) else SINGLE
        setattr(parent, name, Fp8Linear(child.in_features, child.out_features, child.bias is not None, tp))
    return len(swaps)


# ------------------------------------------------------------------------- compressed-tensors checkpoints


def fp8_scheme(hf: dict) -> tuple[str, bool] | None:
    """(weight strategy "channel" | "tensor", LM head quantized) of a compressed-tensors FP8 checkpoint,
    None for an unquantized one. Raises ValueError, naming the setting, for quantizations we cannot run
    (other methods or bit widths, static activation scales, grouped weights)."""
    q = hf.get("quantization_config") or hf.get("compression_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported (compressed-tensors FP8 is)")
    groups = list((q.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"quantization_config.config_groups: exactly one group is supported, got {len(groups)}")
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations") or {}
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ValueError(f"quantization_config weights {weights.get('type')} {weights.get('num_bits')} bits: "
                         "only float 8-bit (FP8 e4m3) is supported")
    strategy = weights.get("strategy")
    if strategy not in ("channel", "tensor"):
        raise ValueError(f"quantization_config weights.strategy {strategy!r}: only channel or tensor")
    if acts and not (acts.get("dynamic") and acts.get("strategy", "token") == "token"):
        raise ValueError("quantization_config input_activations: only dynamic per-token scales are supported")
    ignore = q.get("ignore") or []
    return strategy, not any(name == "lm_head" or name.endswith("lm_head") for name in ignore)


def with_scale_slots(model: nn.Module, slots: dict, slot_class) -> dict:
    """The checkpoint slots plus, for each weight that lands in an Fp8Linear, its ``weight_scale``: the
    same rows (and, for a column-parallel shard, the same rank's rows). A per-tensor scale (one value)
    is spread over the rows it covers; a row-parallel rank reads every row's scale."""
    fp8 = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    params = dict(model.named_parameters())
    out = dict(slots)
    for src, slot in slots.items():
        module = slot.param.rsplit(".", 1)[0]
        if not (src.endswith(".weight") and slot.param.endswith(".weight") and module in fp8):
            continue
        n = (slot.rows[1] - slot.rows[0]) if slot.rows else params[slot.param].shape[0]
        shard = slot.shard if slot.shard is not None and slot.shard.dim == 0 else None
        out[src[: -len("weight")] + "weight_scale"] = slot_class(
            module + ".weight_scale", slot.rows, transform=_ScaleRows(n, shard), shard=None)
    return out


class _ScaleRows:
    """A checkpoint scale tensor -> the [n] fp32 scales of the rows a slot fills: a per-tensor scale
    repeated, a per-channel one ([out] or [out, 1]) cut to this rank's shard."""

    def __init__(self, n: int, shard):
        self.n, self.shard = n, shard

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float().reshape(-1)
        if t.numel() == 1:
            return t.expand(self.n).clone()
        if self.shard is not None:
            if t.numel() != self.shard.size:
                raise ValueError(f"weight_scale has {t.numel()} rows, expected {self.shard.size}")
            t = self.shard.read(t)
        return t


# Per-layer KV-cache scales in a checkpoint (vLLM's and llm-compressor's names) -> (layer, "k" | "v").
_KV_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:(k|v)_scale|(k|v)_proj\.output_scale)$")


def kv_scale_name(name: str) -> tuple[int, str] | None:
    m = _KV_SCALE.match(name)
    return None if m is None else (int(m.group(1)), m.group(2) or m.group(3))


def is_fp8_side_tensor(name: str) -> bool:
    """Checkpoint tensors of a quantized checkpoint that hold nothing we load: zero points of symmetric
    float weights and input scales of dynamic activations (fp8_scheme refuses static ones)."""
    return name.endswith((".weight_zero_point", ".input_scale", ".input_zero_point"))
