"""GPT-2: learned absolute positions, pre-LayerNorm blocks, GELU (tanh) MLP, tied LM head.

HF stores GPT-2's linears as Conv1D, weight [in, out]; they are transposed into nn.Linear on load.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from gpu_worker.attention_metadata import AttentionMetadata
from gpu_worker.models.layers import MLP, Attention, CausalLM, KVCache, Slot, load_slots


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
    def __init__(self, args: GPT2Args, layer_id: int):
        super().__init__()
        head_dim = args.hidden_size // args.num_heads
        scale = head_dim**-0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            scale /= layer_id + 1
        self.ln_1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.attn = Attention(
            args.hidden_size, args.num_heads, args.num_heads, head_dim, None, qkv_bias=True, o_bias=True, scale=scale
        )
        self.ln_2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.activation)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        x = x + self.attn(positions, self.ln_1(x), kv_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(CausalLM):
    args_class = GPT2Args

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.args = args
        self.wte = nn.Embedding(args.vocab_size, args.hidden_size)
        self.wpe = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.h = nn.ModuleList(GPT2Block(args, i) for i in range(args.num_layers))
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
        """HF checkpoint tensor name -> where it goes here (Conv1D weights transposed)."""
        t = lambda w: w.t()
        slots = {
            "transformer.wte.weight": Slot("wte.weight"),
            "transformer.wpe.weight": Slot("wpe.weight"),
            "transformer.ln_f.weight": Slot("ln_f.weight"),
            "transformer.ln_f.bias": Slot("ln_f.bias"),
        }
        if not self.args.tie_word_embeddings:
            slots["lm_head.weight"] = Slot("lm_head.weight")
        for i in range(self.args.num_layers):
            src, dst = f"transformer.h.{i}.", f"h.{i}."
            for ours, theirs in (
                ("attn.qkv_proj", "attn.c_attn"),
                ("attn.o_proj", "attn.c_proj"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                slots[f"{src}{theirs}.weight"] = Slot(f"{dst}{ours}.weight", transform=t)
                slots[f"{src}{theirs}.bias"] = Slot(f"{dst}{ours}.bias")
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
