"""OPT: learned positions (table offset by 2), LayerNorm before (most sizes) or after (350m) each
sublayer, ReLU MLP, and project_in / project_out around the decoder when word_embed_proj_dim differs
from hidden_size.
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
    Slot,
    column_slots,
    load_slots,
    qkv_ranges,
    row_slots,
    table_slot,
    weight_slots,
)
from gpu_worker.models.parallel import SINGLE, ParallelEmbedding, TPGroup

POSITION_OFFSET = 2  # OPT's position table starts with two unused rows


@dataclass(frozen=True)
class OPTArgs:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True  # the decoder's last LayerNorm (pre-LN models only)
    layer_norm_affine: bool = True
    enable_bias: bool = True
    activation: str = "relu"
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, hf: dict) -> "OPTArgs":
        before = hf.get("do_layer_norm_before", True)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_dim=hf["ffn_dim"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf["max_position_embeddings"],
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
            do_layer_norm_before=before,
            final_layer_norm=before and not hf.get("_remove_final_layer_norm", False),
            layer_norm_affine=hf.get("layer_norm_elementwise_affine", True),
            enable_bias=hf.get("enable_bias", True),
            activation=hf.get("activation_function", "relu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )


class OPTDecoderLayer(nn.Module):
    def __init__(self, args: OPTArgs, tp: TPGroup):
        super().__init__()
        self.do_layer_norm_before = args.do_layer_norm_before
        head_dim = args.hidden_size // args.num_heads
        bias = args.enable_bias
        self.self_attn_layer_norm = nn.LayerNorm(args.hidden_size, elementwise_affine=args.layer_norm_affine)
        self.self_attn = Attention(
            args.hidden_size, args.num_heads, args.num_heads, head_dim, None, qkv_bias=bias, o_bias=bias, tp=tp
        )
        self.final_layer_norm = nn.LayerNorm(args.hidden_size, elementwise_affine=args.layer_norm_affine)
        self.mlp = MLP(args.hidden_size, args.ffn_dim, args.activation, bias, tp, "ffn_dim")

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        if self.do_layer_norm_before:
            x = x + self.self_attn(positions, self.self_attn_layer_norm(x), kv_cache, meta)
            return x + self.mlp(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.self_attn(positions, x, kv_cache, meta))
        return self.final_layer_norm(x + self.mlp(x))


class OPTForCausalLM(CausalLM):
    args_class = OPTArgs

    def __init__(self, args: OPTArgs, tp: TPGroup = SINGLE):
        super().__init__()
        self.args, self.tp = args, tp
        projected = args.word_embed_proj_dim != args.hidden_size
        self.embed_tokens = ParallelEmbedding(args.vocab_size, args.word_embed_proj_dim, tp)
        self.embed_positions = ParallelEmbedding(args.max_position_embeddings + POSITION_OFFSET, args.hidden_size, tp)
        self.project_in = nn.Linear(args.word_embed_proj_dim, args.hidden_size, bias=False) if projected else None
        self.layers = nn.ModuleList(OPTDecoderLayer(args, tp) for _ in range(args.num_layers))
        self.final_layer_norm = (
            nn.LayerNorm(args.hidden_size, elementwise_affine=args.layer_norm_affine) if args.final_layer_norm else None
        )
        self.project_out = nn.Linear(args.hidden_size, args.word_embed_proj_dim, bias=False) if projected else None
        self.make_lm_head(self.embed_tokens, args.tie_word_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> [T, word_embed_proj_dim] (the LM head's input width)
        h = self.embed_tokens(input_ids)  # [T, word_embed_proj_dim]
        if self.project_in is not None:
            h = self.project_in(h)  # [T, hidden]
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(positions, h, kv_cache, attn_meta)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h

    def checkpoint_slots(self) -> dict[str, Slot]:
        """HF checkpoint tensor name -> where this rank's part of it goes (q/k/v fused)."""
        a, tp = self.args, self.tp
        bias, affine = a.enable_bias, a.layer_norm_affine
        head_dim = a.hidden_size // a.num_heads
        qkv = qkv_ranges(tp, a.num_heads, a.num_heads, head_dim)
        ffn = tp.split(a.ffn_dim, "ffn_dim")
        slots = {
            "model.decoder.embed_tokens.weight": table_slot("embed_tokens.weight", self.embed_tokens),
            "model.decoder.embed_positions.weight": table_slot("embed_positions.weight", self.embed_positions),
        }
        if self.project_in is not None:
            slots["model.decoder.project_in.weight"] = Slot("project_in.weight")
            slots["model.decoder.project_out.weight"] = Slot("project_out.weight")
        if self.final_layer_norm is not None and affine:
            slots |= weight_slots("model.decoder.final_layer_norm", "final_layer_norm", True)
        if not a.tie_word_embeddings:
            slots["lm_head.weight"] = table_slot("lm_head.weight", self.embed_tokens)
        for i in range(a.num_layers):
            src, dst = f"model.decoder.layers.{i}.", f"layers.{i}."
            attn = src + "self_attn."
            slots |= column_slots(
                [attn + "q_proj", attn + "k_proj", attn + "v_proj"],
                dst + "self_attn.qkv_proj",
                list(qkv),
                [a.hidden_size] * 3,
                bias,
            )
            slots |= row_slots(attn + "out_proj", dst + "self_attn.o_proj", qkv[0], a.hidden_size, bias)
            slots |= column_slots([src + "fc1"], dst + "mlp.fc1", [ffn], [a.ffn_dim], bias)
            slots |= row_slots(src + "fc2", dst + "mlp.fc2", ffn, a.ffn_dim, bias)
            if affine:
                for norm in ("self_attn_layer_norm", "final_layer_norm"):
                    slots |= weight_slots(src + norm, dst + norm, True)
        return slots

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Checkpoints saved from OPTModel (most of the hub's) lack the "model." prefix.
        tied = self.args.tie_word_embeddings
        renamed = (("model." + n if n.startswith("decoder.") else n, w) for n, w in weights)
        load_slots(self, renamed, self.checkpoint_slots(), ignore=lambda name: tied and name == "lm_head.weight")
