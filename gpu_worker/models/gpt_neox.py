"""GPT-NeoX (Pythia, Dolly v2): LayerNorm, partial rotary (``rotary_pct`` of each head), GELU MLP, and
a parallel residual (x + attn(ln1(x)) + mlp(ln2(x))) or the sequential one, per config.

HF's fused query_key_value rows are laid out per head, [heads, 3 (q/k/v), head_dim]; they are
regrouped into our [q heads | k heads | v heads] on load; a tensor-parallel rank reads the contiguous rows
of its own heads and regroups those.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.models.layers import (
    MLP,
    Attention,
    CausalLM,
    KVCache,
    RopeParams,
    RotaryEmbedding,
    Slot,
    column_slots,
    load_slots,
    row_slots,
    table_slot,
    weight_slots,
)
from gpu_worker.models.parallel import SINGLE, ParallelEmbedding, TPGroup, rows_shard


@dataclass(frozen=True)
class GPTNeoXArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    rope: RopeParams
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, hf: dict) -> "GPTNeoXArgs":
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf["max_position_embeddings"],
            rope=RopeParams.from_hf(hf, head_dim, default_partial=0.25),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            activation=hf.get("hidden_act", "gelu"),
            use_parallel_residual=hf.get("use_parallel_residual", True),
            attention_bias=hf.get("attention_bias", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
        )


class GPTNeoXLayer(nn.Module):
    def __init__(self, args: GPTNeoXArgs, rotary: RotaryEmbedding, tp: TPGroup):
        super().__init__()
        self.use_parallel_residual = args.use_parallel_residual
        head_dim = args.hidden_size // args.num_heads
        bias = args.attention_bias
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.attention = Attention(
            args.hidden_size, args.num_heads, args.num_heads, head_dim, rotary, qkv_bias=bias, o_bias=bias, tp=tp
        )
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.activation, tp=tp)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        attn = self.attention(positions, self.input_layernorm(x), kv_cache, meta)
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXForCausalLM(CausalLM):
    args_class = GPTNeoXArgs

    def __init__(self, args: GPTNeoXArgs, tp: TPGroup = SINGLE):
        super().__init__()
        self.args, self.tp = args, tp
        rotary = RotaryEmbedding(args.rope, args.max_position_embeddings)
        self.embed_in = ParallelEmbedding(args.vocab_size, args.hidden_size, tp)
        self.layers = nn.ModuleList(GPTNeoXLayer(args, rotary, tp) for _ in range(args.num_layers))
        self.final_layer_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.make_lm_head(self.embed_in, args.tie_word_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> [T, hidden]
        h = self.embed_in(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(positions, h, kv_cache, attn_meta)
        return self.final_layer_norm(h)

    def _regroup_qkv(self, w: torch.Tensor) -> torch.Tensor:
        # w: [heads * 3 * head_dim, ...] per head (q, k, v) -> [3 * heads * head_dim, ...] q, k, v blocks
        head_dim = self.args.hidden_size // self.args.num_heads
        return w.reshape(-1, 3, head_dim, *w.shape[1:]).transpose(0, 1).reshape(w.shape)

    def checkpoint_slots(self) -> dict[str, Slot]:
        """HF checkpoint tensor name -> where this rank's part of it goes."""
        a, tp = self.args, self.tp
        bias = a.attention_bias
        head_dim = a.hidden_size // a.num_heads
        h0, h1 = tp.split(a.num_heads, "num_attention_heads")
        heads_rows = rows_shard(h0 * 3 * head_dim, h1 * 3 * head_dim, 3 * a.hidden_size)  # this rank's heads
        inter = tp.split(a.intermediate_size, "intermediate_size")
        slots = {
            "gpt_neox.embed_in.weight": table_slot("embed_in.weight", self.embed_in),
            "gpt_neox.final_layer_norm.weight": Slot("final_layer_norm.weight"),
            "gpt_neox.final_layer_norm.bias": Slot("final_layer_norm.bias"),
        }
        if not a.tie_word_embeddings:
            slots["embed_out.weight"] = table_slot("lm_head.weight", self.embed_in)
        for i in range(a.num_layers):
            src, dst = f"gpt_neox.layers.{i}.", f"layers.{i}."
            qkv = (f"{src}attention.query_key_value", f"{dst}attention.qkv_proj")
            slots[f"{qkv[0]}.weight"] = Slot(f"{qkv[1]}.weight", transform=self._regroup_qkv, shard=heads_rows)
            if bias:
                slots[f"{qkv[0]}.bias"] = Slot(f"{qkv[1]}.bias", transform=self._regroup_qkv, shard=heads_rows)
            q_cols = (h0 * head_dim, h1 * head_dim)
            slots |= row_slots(f"{src}attention.dense", f"{dst}attention.o_proj", q_cols, a.hidden_size, bias)
            slots |= column_slots([f"{src}mlp.dense_h_to_4h"], f"{dst}mlp.fc1", [inter], [a.intermediate_size], True)
            slots |= row_slots(f"{src}mlp.dense_4h_to_h", f"{dst}mlp.fc2", inter, a.intermediate_size, True)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                slots |= weight_slots(src + norm, dst + norm, True)
        return slots

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # transformers 5 names the head lm_head in memory and embed_out on disk; accept both.
        tied = self.args.tie_word_embeddings
        renamed = ((("embed_out." + n[8:]) if n.startswith("lm_head.") else n, w) for n, w in weights)
        load_slots(
            self,
            renamed,
            self.checkpoint_slots(),
            ignore=lambda name: (
                name.endswith((".attention.bias", ".attention.masked_bias", ".inv_freq"))
                or (tied and name == "embed_out.weight")
            ),
        )
