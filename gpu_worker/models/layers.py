"""Layers shared by the model families: norms, rotary embedding, paged attention, MLPs, weight slots.

Every layer takes the step's flattened varlen batch ([num_tokens, ...], no batch dimension); attention
reads and writes the paged KV cache through ``AttentionMetadata``.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.models.parallel import (
    SINGLE,
    ParallelEmbedding,
    RowParallelLinear,
    Shard,
    TPGroup,
    cols_shard,
    rows_shard,
)
from kernels import apply_rotary, paged_attention, rms_norm, silu_and_mul, store_kv
from kernels.silu_mul_quant import silu_mul_quant

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, H_kv, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [num_tokens, dim] -> (normed, x + residual)
        return rms_norm(x, self.weight, self.eps, residual)


# Activations by their transformers config name. The tanh GELUs are one formula under several names.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def layer_windows(hf: dict, num_layers: int) -> tuple[int | None, ...]:
    """Per-layer sliding attention window from an HF config; () when no layer slides.

    Mistral windows every layer; Qwen2/Qwen3 only with use_sliding_window, and then only the layers
    that ``layer_types`` marks (default: from ``max_window_layers`` on).
    """
    window, model_type = hf.get("sliding_window"), hf.get("model_type")
    if window is None or model_type not in ("mistral", "qwen2", "qwen3"):
        return ()
    if model_type == "mistral":
        return (int(window),) * num_layers
    if not hf.get("use_sliding_window", False):
        return ()
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(num_layers)
    ]
    windows = tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return windows if any(w is not None for w in windows) else ()


# ---------------------------------------------------------------------------------------------- rotary


@dataclass(frozen=True)
class RopeParams:
    """Rotary settings read from an HF config, in either its new (``rope_parameters``) or its old
    (``rope_theta`` + ``rope_scaling``) form."""

    theta: float
    rotary_dim: int  # channels of each head that rotate: head_dim * partial_rotary_factor
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    scaling: tuple[tuple[str, float], ...] = ()  # type-specific numbers (factor, low_freq_factor, ...)

    def __post_init__(self):
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: default, linear, llama3")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and positive, got {self.rotary_dim}")

    @classmethod
    def from_hf(cls, hf: dict, head_dim: int, default_partial: float = 1.0) -> "RopeParams":
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = params.pop("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        partial = params.pop(
            "partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial))
        )
        if rope_type == "llama3":  # a top-level value wins, as in transformers
            original = hf.get("original_max_position_embeddings")
            params["original_max_position_embeddings"] = (
                original or params.get("original_max_position_embeddings") or hf["max_position_embeddings"]
            )
        numbers = tuple(sorted((k, float(v)) for k, v in params.items() if isinstance(v, int | float)))
        return cls(float(theta), int(head_dim * partial), rope_type, numbers)

    def inv_freq(self) -> torch.Tensor:  # [rotary_dim / 2] fp32
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float, device="cpu") / self.rotary_dim
        inv_freq = 1.0 / (self.theta**exponents)
        s = dict(self.scaling)
        if self.rope_type == "linear":
            inv_freq = inv_freq / s["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, s)
        return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, float]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths are divided by ``factor``, short ones kept, and the band
    between is a linear blend in 1 / wavelength."""
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    blend = (old_len / wavelen - low) / (high - low)  # 0 at the long edge, 1 at the short edge
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, blended, out)


class RotaryEmbedding(nn.Module):
    """Holds cos_sin_cache [max_positions, rotary_dim] = cat(cos, sin), computed in fp32 on the CPU as
    transformers does, then stored in the model dtype (transformers casts cos/sin to the activations')."""

    def __init__(self, params: RopeParams, max_positions: int, is_neox: bool = True):
        super().__init__()
        self.params = params
        self.max_positions = max_positions
        self.is_neox = is_neox
        self.register_buffer("cos_sin_cache", self._cos_sin(torch.get_default_device()), persistent=False)

    def _cos_sin(self, device: torch.device) -> torch.Tensor:  # [max_positions, rotary_dim] fp32
        if device.type == "meta":  # built for loading: init_buffers() fills it on the real device
            return torch.empty(self.max_positions, self.params.rotary_dim, device=device)
        positions = torch.arange(self.max_positions, dtype=torch.float, device="cpu")
        freqs = torch.outer(positions, self.params.inv_freq())  # [max_positions, rotary_dim / 2]
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)

    def init_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Compute the cache on ``device`` after the module was built on the meta device (loader.py)."""
        self.cos_sin_cache = self._cos_sin(device).to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        # positions: [T]; q: [T, H, D]; k: [T, H_kv, D]; rotated in place
        apply_rotary(positions, q, k, self.cos_sin_cache, self.is_neox)


# ------------------------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Fused qkv projection -> (per-head q/k RMSNorm) -> rotary -> store K/V in the paged cache ->
    paged attention over the whole context -> output projection.

    qkv_proj.weight rows are [q heads | k heads | v heads], each head ``head_dim`` rows. Under tensor
    parallelism a rank holds its own query heads and the KV heads they read (``qkv_ranges``), so qkv_proj
    is column-parallel, the KV cache holds this rank's KV heads only, and o_proj is row-parallel.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding | None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        scale: float | None = None,
        sliding_window: int | None = None,
        qk_norm_eps: float | None = None,
        tp: TPGroup = SINGLE,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        (h0, h1), (kv0, kv1), _ = qkv_ranges(tp, num_heads, num_kv_heads, 1)
        self.num_heads, self.num_kv_heads, self.head_dim = h1 - h0, kv1 - kv0, head_dim  # this rank's heads
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, hidden_size, o_bias, tp)
        self.rotary = rotary
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        # Per-tensor scales of an fp8 KV cache (K / k_scale is stored): the checkpoint's, else 1.0.
        self.k_scale, self.v_scale = 1.0, 1.0

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        # positions: [T]; x: [T, hidden] -> [T, hidden]
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim))[0].view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim))[0].view_as(k)
        if self.rotary is not None:
            self.rotary(positions, q, k)
        k_cache, v_cache = kv_cache
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        out = paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            sliding_window=self.sliding_window,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


def qkv_ranges(
    tp: TPGroup, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """This rank's [start, stop) rows of the checkpoint's q, k and v projections (each its own tensor)."""
    h0, h1 = tp.split(num_heads, "num_attention_heads")
    kv0, kv1 = tp.kv_heads(num_kv_heads)
    kv = (kv0 * head_dim, kv1 * head_dim)
    return (h0 * head_dim, h1 * head_dim), kv, kv


# ------------------------------------------------------------------------------------------------ MLPs


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate_up_proj.weight rows are [gate | up], under tensor
    parallelism this rank's intermediate slice of each (column-parallel), and down_proj row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act: str = "silu",
                 tp: TPGroup = SINGLE):
        super().__init__()
        if act != "silu":
            raise ValueError(f"gated MLP supports hidden_act 'silu' only, got {act!r}")
        start, stop = tp.split(intermediate_size, "intermediate_size")
        self.gate_up_proj = nn.Linear(hidden_size, 2 * (stop - start), bias=bias)
        self.down_proj = RowParallelLinear(stop - start, hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden]
        gate_up = self.gate_up_proj(x)
        if hasattr(self.down_proj, "forward_quantized"):  # fp8 (gpu_worker/fp8.py): fused activation + quantize
            return self.down_proj.forward_quantized(*silu_mul_quant(gate_up), gate_up.dtype)
        return self.down_proj(silu_and_mul(gate_up))


class MLP(nn.Module):
    """fc2(act(fc1(x))), the MLP of GPT-2, GPT-NeoX and OPT; fc1 column-parallel, fc2 row-parallel."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool = True,
                 tp: TPGroup = SINGLE, size_name: str = "intermediate_size"):  # size_name: the config's, for errors
        super().__init__()
        start, stop = tp.split(intermediate_size, size_name)
        self.fc1 = nn.Linear(hidden_size, stop - start, bias=bias)
        self.fc2 = RowParallelLinear(stop - start, hidden_size, bias, tp)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden]
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor lands: a parameter, optionally a row range of a fused one, after an
    optional transform (e.g. a transpose of GPT-2's Conv1D weights). Under tensor parallelism a rank reads
    only its ``shard`` of the checkpoint tensor."""

    param: str
    rows: tuple[int, int] | None = None  # [start, stop) along dim 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    shard: Shard | None = None  # None: the whole tensor (replicated on every rank)


def weight_slots(src: str, dst: str, bias: bool, rows: tuple[int, int] | None = None) -> dict[str, Slot]:
    """Slots of a checkpoint module's ``src.weight`` (and ``src.bias``), whole, into our module ``dst``."""
    slots = {f"{src}.weight": Slot(f"{dst}.weight", rows)}
    if bias:
        slots[f"{src}.bias"] = Slot(f"{dst}.bias", rows)
    return slots


def column_slots(
    srcs: list[str], dst: str, ranges: list[tuple[int, int]], sizes: list[int], bias: bool
) -> dict[str, Slot]:
    """Slots of checkpoint linears (``sizes`` output rows each) whose row ``ranges`` this rank stacks, in
    order, into its column-parallel linear ``dst`` (e.g. q, k, v into qkv_proj)."""
    slots, start = {}, 0
    for src, (first, stop), size in zip(srcs, ranges, sizes, strict=True):
        rows, shard = (start, start + stop - first), rows_shard(first, stop, size)
        slots[f"{src}.weight"] = Slot(f"{dst}.weight", rows, shard=shard)
        if bias:
            slots[f"{src}.bias"] = Slot(f"{dst}.bias", rows, shard=shard)
        start += stop - first
    return slots


def row_slots(src: str, dst: str, cols: tuple[int, int], size: int, bias: bool) -> dict[str, Slot]:
    """Slots of a checkpoint linear (``size`` input features) whose input columns ``cols`` this rank reads
    into its row-parallel linear ``dst``; the bias is whole on every rank."""
    slots = {f"{src}.weight": Slot(f"{dst}.weight", shard=cols_shard(*cols, size))}
    if bias:
        slots[f"{src}.bias"] = Slot(f"{dst}.bias")
    return slots


def table_slot(param: str, table: ParallelEmbedding) -> Slot:
    """This rank's rows of an embedding table, or of an LM head split by vocabulary like it."""
    start, stop = table.start, table.stop
    return Slot(param, (0, stop - start), shard=rows_shard(start, stop, table.num_rows))


def _read(name: str, ref, shard: Shard | None) -> torch.Tensor:
    """The checkpoint tensor ``ref`` (a tensor or a lazy safetensors slice), whole or this rank's shard."""
    if shard is None:
        return ref if isinstance(ref, torch.Tensor) else ref[...]
    shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else tuple(ref.get_shape())
    if len(shape) <= shard.dim or shape[shard.dim] != shard.size:
        raise ValueError(f"checkpoint tensor {name!r} has shape {shape}, expected {shard.size} along dim {shard.dim}")
    return shard.read(ref)


def load_slots(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    slots: dict[str, Slot],
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Copy every checkpoint tensor, or this rank's shard of it, into its slot (casting to the parameter's
    device and dtype). ``weights`` yields tensors or lazy safetensors slices (loader.iter_weights), of
    which only the shard is read.

    Raises ValueError naming the tensors the checkpoint lacks, a tensor with the wrong shape, or a
    tensor that has no slot and is not ignored (a weight we would otherwise drop silently).
    """
    from gpu_worker import fp8  # fp8 imports models.parallel: a module-level import would be circular

    slots = fp8.with_scale_slots(model, slots, Slot)
    params = dict(model.named_parameters())
    pending = dict(slots)
    for name, ref in weights:
        if ignore(name) or fp8.is_fp8_side_tensor(name):
            continue
        kv_scale = fp8.kv_scale_name(name)
        if kv_scale is not None:  # an fp8 KV cache's per-layer scale: a float on the layer's attention
            layer, which = kv_scale
            setattr(model.get_submodule(f"layers.{layer}.self_attn"), f"{which}_scale", float(_read(name, ref, None)))
            continue
        slot = pending.pop(name, None)
        if slot is None:
            if name in slots:
                continue  # the same tensor in two shards
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        tensor = _read(name, ref, slot.shard)
        if slot.transform is not None:
            tensor = slot.transform(tensor)
        target = params[slot.param].data
        if slot.rows is not None:
            target = target[slot.rows[0] : slot.rows[1]]
        if target.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        target.copy_(tensor)
    if pending:
        raise ValueError(f"checkpoint is missing tensor(s): {', '.join(sorted(pending))}")


class CausalLM(nn.Module):
    """What every family's top module shares: built from its frozen Args (``args_class.from_hf``) for one
    tensor-parallel rank, an LM head over the token embedding (the same tensor when the config ties them;
    both split by vocabulary rows), float32 logits over the whole vocabulary."""

    args_class: type
    tp: TPGroup

    @classmethod
    def from_hf_config(cls, hf: dict, tp: TPGroup = SINGLE) -> "CausalLM":
        return cls(cls.args_class.from_hf(hf), tp)

    def make_lm_head(self, embedding: ParallelEmbedding, tie: bool) -> None:
        self.lm_head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
        if tie:
            self.lm_head.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, d] -> [n, vocab], model dtype
        # Left in the model's dtype: greedy steps take the argmax as it is (bf16 -> fp32 is exact, so the
        # argmax is the same), which saves writing and reading an fp32 copy of [n, vocab] every step
        # (0.23 ms of a 512-sequence Qwen3-0.6B decode step on an H200); the sampler upcasts when it
        # needs probabilities.
        logits = self.lm_head(hidden)  # [n, this rank's vocabulary rows]
        if self.tp.world_size > 1:
            # Every rank gets every logit, so every rank samples the same tokens: each appends them to
            # its own copy of the sequences, whose next inputs must agree across ranks.
            logits = self.tp.all_gather(logits)[:, : self.args.vocab_size]
        return logits
