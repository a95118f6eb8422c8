"""The Llama family: Llama 1/2/3, Mistral, Qwen2, Qwen3.

Pre-norm decoder with RMSNorm (residual add fused into the norm), rotary, GQA attention, SwiGLU MLP.
Mistral adds a sliding attention window, Qwen2 q/k/v biases, Qwen3 a per-head RMSNorm on q and k
before rotary; Qwen2/3 may window some layers only.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.models.layers import (
    Attention,
    CausalLM,
    GatedMLP,
    KVCache,
    RMSNorm,
    RopeParams,
    RotaryEmbedding,
    Slot,
    column_slots,
    layer_windows,
    load_slots,
    qkv_ranges,
    row_slots,
    table_slot,
)
from gpu_worker.models.parallel import SINGLE, ParallelEmbedding, TPGroup


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope: RopeParams
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    layer_windows: tuple[int | None, ...] = ()  # per layer sliding window; () = none anywhere
    qk_norm: bool = False  # Qwen3
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaArgs":
        model_type = hf.get("model_type", "llama")
        num_heads, num_layers = hf["num_attention_heads"], hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        attention_bias = hf.get("attention_bias", False)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=hf["max_position_embeddings"],
            rope=RopeParams.from_hf(hf, head_dim),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=hf.get("mlp_bias", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            layer_windows=layer_windows(hf, num_layers),
            qk_norm=model_type == "qwen3",
            hidden_act=hf.get("hidden_act", "silu"),
        )


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: RotaryEmbedding, layer_id: int, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(
            args.hidden_size,
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
            rotary,
            qkv_bias=args.qkv_bias,
            o_bias=args.o_bias,
            sliding_window=args.layer_windows[layer_id] if args.layer_windows else None,
            qk_norm_eps=args.rms_norm_eps if args.qk_norm else None,
            tp=tp,
        )
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.mlp_bias, args.hidden_act, tp)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, hidden] is the previous layer's output not yet added to residual [T, hidden]
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(CausalLM):
    args_class = LlamaArgs

    def __init__(self, args: LlamaArgs, tp: TPGroup = SINGLE):
        super().__init__()
        self.args, self.tp = args, tp
        rotary = RotaryEmbedding(args.rope, args.max_position_embeddings)
        self.embed_tokens = ParallelEmbedding(args.vocab_size, args.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, rotary, i, tp) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.make_lm_head(self.embed_tokens, args.tie_word_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> [T, hidden]
        h, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(positions, h, residual, kv_cache, attn_meta)
        return self.norm(h, residual)[0]

    def checkpoint_slots(self) -> dict[str, Slot]:
        """HF checkpoint tensor name -> where this rank's part of it goes (q/k/v and gate/up are fused)."""
        a, tp = self.args, self.tp
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        qkv = qkv_ranges(tp, a.num_heads, a.num_kv_heads, a.head_dim)
        inter = tp.split(a.intermediate_size, "intermediate_size")
        slots = {
            "model.embed_tokens.weight": table_slot("embed_tokens.weight", self.embed_tokens),
            "model.norm.weight": Slot("norm.weight"),
        }
        if not a.tie_word_embeddings:
            slots["lm_head.weight"] = table_slot("lm_head.weight", self.embed_tokens)
        for i in range(a.num_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            attn, mlp = src + "self_attn.", src + "mlp."
            slots |= column_slots(
                [attn + "q_proj", attn + "k_proj", attn + "v_proj"],
                dst + "self_attn.qkv_proj",
                list(qkv),
                [q, kv, kv],
                a.qkv_bias,
            )
            slots |= row_slots(attn + "o_proj", dst + "self_attn.o_proj", qkv[0], q, a.o_bias)
            if a.qk_norm:
                slots[attn + "q_norm.weight"] = Slot(dst + "self_attn.q_norm.weight")
                slots[attn + "k_norm.weight"] = Slot(dst + "self_attn.k_norm.weight")
            slots |= column_slots(
                [mlp + "gate_proj", mlp + "up_proj"],
                dst + "mlp.gate_up_proj",
                [inter, inter],
                [a.intermediate_size, a.intermediate_size],
                a.mlp_bias,
            )
            slots |= row_slots(mlp + "down_proj", dst + "mlp.down_proj", inter, a.intermediate_size, a.mlp_bias)
            slots[src + "input_layernorm.weight"] = Slot(dst + "input_layernorm.weight")
            slots[src + "post_attention_layernorm.weight"] = Slot(dst + "post_attention_layernorm.weight")
        return slots

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = self.args.tie_word_embeddings
        load_slots(
            self,
            weights,
            self.checkpoint_slots(),
            # rotary tables are recomputed; a tied head may still be saved beside the embedding
            ignore=lambda name: "rotary_emb." in name or (tied and name == "lm_head.weight"),
        )
