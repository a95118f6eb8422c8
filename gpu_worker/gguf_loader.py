"""GGUF checkpoints (llama.cpp's one-file format): an HF config and HF-named weights for our models.

The file is read with the gguf package's reader (memory-mapped). Its metadata becomes the config dict
that transformers builds from it: llama.cpp's keys renamed as transformers renames them, then the
transformers config class of that model type fills in its defaults, exactly as
``from_pretrained(..., gguf_file=...)`` does. Its tensors are dequantized on the target device
(gpu_worker.gguf_dequant), renamed to the Hugging Face names, given back the row order that llama.cpp's
converter permuted, and handed to ``model.load_weights`` like a safetensors checkpoint's tensors, so
every loading rule (fused slots, tied heads, tensor-parallel slices) applies unchanged.
"""

import functools
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from tqdm import tqdm

from gpu_worker.gguf_dequant import SUPPORTED_TYPES, dequantize

# general.architecture -> HF model_type, for the families both transformers' GGUF loading and our
# models cover. llama.cpp also writes Mistral as "llama" (see gguf_hf_config).
SUPPORTED_ARCHITECTURES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# "<arch>.<key>" -> HF config key, as transformers renames them for these families.
_CONFIG_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_ID_KEYS: dict[str, str] = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}

# llama.cpp tensor name -> HF name: whole-model tensors, then per-layer ones ("blk.N.<key>").
_MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama 3's rotary frequency factors: transformers skips them (its GGUF config has no rope scaling),
# so the same model would differ from it if we applied them.
_SKIPPED_TENSORS = {"rope_freqs.weight"}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@functools.lru_cache(maxsize=1)
def _reader(path: Path, mtime_ns: int) -> GGUFReader:
    return GGUFReader(path)


def read_gguf(path: str | Path) -> GGUFReader:
    """The gguf package's reader of ``path``. Parsing the metadata takes seconds for a large
    vocabulary, and a worker reads it twice (config, then tensors), so the last file read is kept."""
    path = Path(path).resolve()
    return _reader(path, path.stat().st_mtime_ns)


def metadata_value(reader: GGUFReader, key: str, default=None):
    """A metadata value as Python (int, float, bool, str, or a list of them); ``default`` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(path: str | Path) -> dict:
    """The Hugging Face config dict transformers builds from the file's metadata (model_type, shapes,
    rotary base, norm epsilon, token ids, tied head), its config class's defaults included.

    Raises ValueError for an architecture outside SUPPORTED_ARCHITECTURES.
    """
    from transformers import AutoConfig

    reader = read_gguf(path)
    arch = metadata_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{Path(path).name}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    model_type = SUPPORTED_ARCHITECTURES[arch]
    # transformers tests `"mistral" in [general.name]`: a list membership, so only that exact name
    if arch == "llama" and metadata_value(reader, "general.name") == "mistral":
        model_type = "mistral"
    hf: dict = {}
    for key, hf_key in _CONFIG_KEYS.items():
        if (value := metadata_value(reader, f"{arch}.{key}")) is not None:
            hf[hf_key] = value
    if arch == "llama" and (rotary := metadata_value(reader, "llama.rope.dimension_count")) is not None:
        hf["head_dim"] = rotary  # transformers reads the rotary width as head_dim for llama only
    for key, hf_key in _TOKEN_ID_KEYS.items():
        if (value := metadata_value(reader, key)) is not None:
            hf[hf_key] = value
    if "vocab_size" not in hf and "tokenizer.ggml.tokens" in reader.fields:
        hf["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    # llama.cpp writes the output projection only when it is not the token embedding
    hf["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    return AutoConfig.for_model(model_type, **hf).to_dict()


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor; None for one that transformers skips too.

    Raises ValueError for a name outside the Llama family's tensors.
    """
    if gguf_name in _SKIPPED_TENSORS:
        return None
    base, _, suffix = gguf_name.rpartition(".")
    if base in _MODEL_TENSORS and suffix in ("weight", "bias"):
        return f"{_MODEL_TENSORS[base]}.{suffix}"
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face name in the supported families")


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for Llama-arch files.

    Per head, HF orders the rows of a Q or K projection [first rotary halves | second halves] (its
    rotate_half); llama.cpp's converter interleaves them (rows 0, d/2, 1, d/2 + 1, ... of a head of d
    rows) for GGML's pairwise rope. w: [num_heads * head_dim, ...]; returns the same shape in HF order.
    """
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_tensor_types(reader: GGUFReader, path: Path) -> None:
    """Raise ValueError naming the first tensor whose GGML type we cannot dequantize, before any loading."""
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES and t.name not in _SKIPPED_TENSORS:
            supported = ", ".join(q.name for q in SUPPORTED_TYPES)
            raise ValueError(f"{path.name}: tensor {t.name} has GGML type {t.tensor_type.name}, which cannot be "
                             f"dequantized (supported: {supported})")


def iter_gguf_weights(
    path: str | Path, hf_config: dict, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor on ``device``) for every tensor of the file, one at a time, shaped as
    the HF checkpoint stores it; the caller casts while copying into its parameters.

    Raises ValueError for a tensor type we cannot dequantize or a tensor name we cannot map.
    """
    path = Path(path)
    reader = read_gguf(path)
    check_tensor_types(reader, path)
    # llama.cpp permutes Q/K rows for its "llama" arch only (Qwen keeps HF's order, using NEOX rope)
    permuted = metadata_value(reader, "general.architecture") == "llama"
    num_heads = hf_config["num_attention_heads"]
    num_kv_heads = hf_config.get("num_key_value_heads") or num_heads
    try:
        for t in tqdm(reader.tensors, desc="loading GGUF weights", unit="tensor", disable=None):
            name = hf_tensor_name(t.name)
            if name is None:
                continue
            raw = torch.from_numpy(np.array(t.data))  # a copy: the memory map is read-only
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGML lists dims innermost first
            weight = dequantize(raw.to(device), t.tensor_type, shape)
            if permuted and ".self_attn.q_proj." in name:
                weight = unpermute_rows(weight, num_heads)
            elif permuted and ".self_attn.k_proj." in name:
                weight = unpermute_rows(weight, num_kv_heads)
            yield name, weight
    finally:
        _reader.cache_clear()  # the reader's parsed metadata is large; nothing reads it after the weights
