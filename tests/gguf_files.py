"""GGUF files for tests, written with the gguf package's writer as llama.cpp's converter lays them out.

``write_gguf`` turns a demo checkpoint (tests.factories.make_checkpoint: config.json, safetensors,
tokenizer.json) into a GGUF file: llama.cpp tensor names, Q/K rows permuted for the "llama" arch,
each tensor stored in the GGML type a plan picks, the byte-level BPE tokenizer as "gpt2" metadata.
Types that gguf can quantize (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) hold the checkpoint's weights
quantized; the K-quants, which gguf cannot quantize, hold random blocks of a similar spread (the
reference, transformers, then loads the same file, so the values need not come from the checkpoint).
"""

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from safetensors.numpy import load_file

Q = GGMLQuantizationType

# Byte offset of each block's float16 scale "d", and of its float16 minimum (None: symmetric type) with
# the multiple of d that roughly centres the block's values on zero.
_SCALE_FIELDS: dict[Q, tuple[int, int | None, float]] = {
    Q.Q8_0: (0, None, 0.0),
    Q.Q4_0: (0, None, 0.0),
    Q.Q4_1: (0, 2, -7.5),  # value = d * q + m, q in 0..15
    Q.Q5_0: (0, None, 0.0),
    Q.Q5_1: (0, 2, -15.5),
    Q.Q2_K: (80, 82, 1.5),  # value = d * sc * q - dmin * m, q in 0..3, sc and m in 0..15
    Q.Q3_K: (108, None, 0.0),
    Q.Q4_K: (0, 2, 7.5),  # q in 0..15, sc and m in 0..63
    Q.Q5_K: (0, 2, 15.5),
    Q.Q6_K: (208, None, 0.0),
}
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf.quants.quantize can


def random_blocks(qtype: Q, num_blocks: int, rng: np.random.Generator, d: float = 0.01) -> np.ndarray:
    """Random bytes [num_blocks, type_size] of a block type, with finite float16 scales near ``d``."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(num_blocks, type_size), dtype=np.uint8)
    d_at, min_at, min_per_d = _SCALE_FIELDS[qtype]
    scales = (d * rng.uniform(0.5, 1.5, size=num_blocks)).astype(np.float16)
    blocks[:, d_at : d_at + 2] = scales.view(np.uint8).reshape(num_blocks, 2)
    if min_at is not None:
        mins = (scales.astype(np.float32) * min_per_d).astype(np.float16)
        blocks[:, min_at : min_at + 2] = mins.view(np.uint8).reshape(num_blocks, 2)
    return blocks


def encode_tensor(weight: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, Q | None]:
    """(array for GGUFWriter.add_tensor, raw_dtype) storing ``weight`` [rows, cols] float32 as ``qtype``;
    K-quants get random blocks of a spread like the weight's, other types random bytes."""
    if qtype == Q.F32:
        return weight.astype(np.float32), None
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(weight.astype(np.float32), qtype), qtype
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = weight.shape
    if qtype not in _SCALE_FIELDS:  # a type we do not load: any bytes of the right size
        return rng.integers(0, 256, size=(rows, cols // block_size * type_size), dtype=np.uint8), qtype
    d = float(weight.std()) / {Q.Q2_K: 12, Q.Q3_K: 40, Q.Q4_K: 200, Q.Q5_K: 400, Q.Q6_K: 1400}[qtype]
    blocks = random_blocks(qtype, rows * cols // block_size, rng, d)
    return blocks.reshape(rows, cols // block_size * type_size), qtype


# HF name pieces -> llama.cpp's (the test's own table, written apart from gpu_worker.gguf_loader's).
_GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        layer, rest = base[len("model.layers."):].split(".", 1)
        return f"blk.{layer}.{_GGUF_NAMES[rest]}.{suffix}"
    return f"{_GGUF_NAMES[base]}.{suffix}"


def permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, interleave the two rotary halves of the rows."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: dict) -> None:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)


def write_gguf(model_dir: str | Path, out: str | Path, plan: Callable[[str], Q], arch: str = "llama",
               seed: int = 0) -> Path:
    """Write the demo checkpoint at ``model_dir`` as the GGUF file ``out``, storing the tensor called
    ``name`` (llama.cpp's name) in type ``plan(name)``. ``arch``: llama, qwen2 or qwen3."""
    model_dir, out = Path(model_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name("pagedserve-test")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _write_tokenizer(writer, model_dir, config)
    rng = np.random.default_rng(seed)
    for hf_name, weight in load_file(model_dir / "model.safetensors").items():
        if config.get("tie_word_embeddings") and hf_name == "lm_head.weight":
            continue
        if arch == "llama" and ".q_proj." in hf_name:
            weight = permute_rows(weight, num_heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            weight = permute_rows(weight, num_kv_heads)
        name = gguf_name(hf_name)
        qtype = plan(name) if weight.ndim == 2 else Q.F32  # llama.cpp keeps norms and biases in F32
        data, raw_dtype = encode_tensor(weight, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# Per family: demo overrides (ffn_down rows of 256 values so K-quants fit; Qwen3's head_dim at its
# config class's default, which transformers assumes since it does not read the key length from GGUF).
FAMILIES = {
    "llama": {"intermediate_size": 256},
    "qwen2": {"intermediate_size": 256},
    "qwen3": {"intermediate_size": 256, "head_dim": 128},
}
# Layer -> tensor -> type; the rest F32. All supported types but Q2_K and Q3_K, which the dequantization
# tests cover (only ffn_down rows, 256 wide, can hold a K-quant here, and there are three).
MIXED = {
    0: {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0, "attn_output": Q.Q5_1, "ffn_gate": Q.BF16,
        "ffn_up": Q.F16, "ffn_down": Q.Q4_K},
    1: {"attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q4_0, "ffn_gate": Q.Q4_1,
        "ffn_up": Q.Q8_0, "ffn_down": Q.Q6_K},
    2: {"attn_q": Q.F16, "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_1, "ffn_down": Q.Q5_K},
}
TEXTS = ["Hello, paged world", "café 日本語 and more", "<s>the</s> 😀 🚀", " leading space", "Zürich São Paulo"]


def mixed_plan(name: str) -> Q:
    if name.startswith("blk."):
        _, layer, kind, _ = name.split(".")
        return MIXED[int(layer)].get(kind, Q.F32)
    return {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0}[name]
