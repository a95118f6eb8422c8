"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP, tied LM head.

HF stores GPT-2's linears as Conv1D, weight [in, out]; they are transposed into nn.Linear on load.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.models.layers import MLP, Attention, CausalLM, KVCache, Slot, load_slots, qkv_ranges, table_slot
from gpu_worker.models.parallel import SINGLE, ParallelEmbedding, Shard, TPGroup, cols_shard, rows_shard


@dataclass(frozen=True)
class GPT2Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Args":
        if hf.get("add_cross_attention"):
            raise ValueError("GPT-2 with cross-attention is not a decoder-only model")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["n_embd"],
            intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            max_position_embeddings=hf["n_positions"],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=hf.get("activation_function", "gelu_new"),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )


class GPT2Block(nn.Module):
    def __init__(self, args: GPT2Args, layer_id: int, tp: TPGroup):
        super().__init__()
        head_dim = args.hidden_size // args.num_heads
        scale = head_dim**-0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            scale /= layer_id + 1
        self.ln_1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.attn = Attention(
            args.hidden_size, args.num_heads, args.num_heads, head_dim, None, qkv_bias=True, o_bias=True, scale=scale,
            tp=tp,
        )
        self.ln_2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.activation, tp=tp, size_name="n_inner")

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        x = x + self.attn(positions, self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(CausalLM):
    args_class = GPT2Args

    def __init__(self, args: GPT2Args, tp: TPGroup = SINGLE):
        super().__init__()
        self.args, self.tp = args, tp
        self.wte = ParallelEmbedding(args.vocab_size, args.hidden_size, tp)
        self.wpe = ParallelEmbedding(args.max_position_embeddings, args.hidden_size, tp)
        self.h = nn.ModuleList(GPT2Block(args, i, tp) for i in range(args.num_layers))
        self.ln_f = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.make_lm_head(self.wte, args.tie_word_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> [T, hidden]
        h = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches, strict=True):
            h = block(positions, h, kv_cache, attn_meta)
        return self.ln_f(h)

    def checkpoint_slots(self) -> dict[str, Slot]:
        """HF checkpoint tensor name -> where this rank's part of it goes. Conv1D weights are [in, out]:
        they are transposed after reading, so a rank's output rows are read as the checkpoint's columns."""
        a, tp = self.args, self.tp
        t = lambda w: w.t()
        d, inter = a.hidden_size, a.intermediate_size
        q, k, v = qkv_ranges(tp, a.num_heads, a.num_heads, d // a.num_heads)
        qkv_cols = (q, (d + k[0], d + k[1]), (2 * d + v[0], 2 * d + v[1]))  # c_attn's columns are [q | k | v]
        i0, i1 = tp.split(inter, "n_inner")
        slots = {
            "transformer.wte.weight": table_slot("wte.weight", self.wte),
            "transformer.wpe.weight": table_slot("wpe.weight", self.wpe),
            "transformer.ln_f.weight": Slot("ln_f.weight"),
            "transformer.ln_f.bias": Slot("ln_f.bias"),
        }
        if not a.tie_word_embeddings:
            slots["lm_head.weight"] = table_slot("lm_head.weight", self.wte)
        for i in range(a.num_layers):
            src, dst = f"transformer.h.{i}.", f"h.{i}."
            slots |= {
                f"{src}attn.c_attn.weight": Slot(f"{dst}attn.qkv_proj.weight", transform=t,
                                                 shard=Shard(1, qkv_cols, 3 * d)),
                f"{src}attn.c_attn.bias": Slot(f"{dst}attn.qkv_proj.bias", shard=Shard(0, qkv_cols, 3 * d)),
                f"{src}attn.c_proj.weight": Slot(f"{dst}attn.o_proj.weight", transform=t, shard=rows_shard(*q, d)),
                f"{src}attn.c_proj.bias": Slot(f"{dst}attn.o_proj.bias"),
                f"{src}mlp.c_fc.weight": Slot(f"{dst}mlp.fc1.weight", transform=t, shard=cols_shard(i0, i1, inter)),
                f"{src}mlp.c_fc.bias": Slot(f"{dst}mlp.fc1.bias", shard=rows_shard(i0, i1, inter)),
                f"{src}mlp.c_proj.weight": Slot(f"{dst}mlp.fc2.weight", transform=t, shard=rows_shard(i0, i1, inter)),
                f"{src}mlp.c_proj.bias": Slot(f"{dst}mlp.fc2.bias"),
            }
            for norm in ("ln_1", "ln_2"):
                slots[f"{src}{norm}.weight"] = Slot(f"{dst}{norm}.weight")
                slots[f"{src}{norm}.bias"] = Slot(f"{dst}{norm}.bias")
        return slots

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The original OpenAI-converted checkpoints have no "transformer." prefix and carry the causal
        # mask buffers attn.bias / attn.masked_bias; a tied head may be saved beside the embedding.
        tied = self.args.tie_word_embeddings
        renamed = (
            (name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name, w) for name, w in weights
        )
        load_slots(
            self,
            renamed,
            self.checkpoint_slots(),
            ignore=lambda name: (
                name.endswith((".attn.bias", ".attn.masked_bias")) or (tied and name == "lm_head.weight")
            ),
        )
