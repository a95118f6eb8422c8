"""What the runner needs to know about a checkpoint, read once from its config.json or a GGUF file's
metadata."""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gpu_worker.model_files import resolve_model
from gpu_worker.models import resolve_architecture
from gpu_worker.models.layers import layer_windows
from gpu_worker.models.parallel import TPGroup

# Each field's names across the families' config.json files, first match wins (GPT-2 has its own).
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer"),
    "num_heads": ("num_attention_heads", "n_head"),
    "hidden_size": ("hidden_size", "n_embd"),
    "max_model_len": ("max_position_embeddings", "n_positions"),
}


def hf_config(path: str | Path) -> dict:
    """A checkpoint's Hugging Face config: its config.json, or what transformers reads from a GGUF file
    (see resolve_model)."""
    files = resolve_model(path)
    if files.gguf_file is not None:
        from gpu_worker.gguf_loader import gguf_hf_config  # imports transformers: only for GGUF

        return gguf_hf_config(files.gguf_file)
    return json.loads((files.path / "config.json").read_text())


def _get(hf: dict, key: str) -> int:
    for name in _ALIASES[key]:
        if hf.get(name) is not None:
            return int(hf[name])
    raise ValueError(f"config.json has none of {_ALIASES[key]}")


def _as_list(ids: int | list[int] | None) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, list) else [int(ids)]


def _sliding_window(windows: tuple[int | None, ...]) -> int | None:
    """The window when every layer slides by the same one (so KV outside it is dead), else None;
    models with windows on some layers only apply them inside the model."""
    return windows[0] if windows and all(w == windows[0] for w in windows) else None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # a supported HF architecture name, e.g. "LlamaForCausalLM"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_model_len: int  # max_position_embeddings
    eos_token_ids: list[int]  # from config.json and generation_config.json, in that order, no repeats
    sliding_window: int | None  # set only when every layer uses this window
    hf_config: dict = field(repr=False, compare=False)  # the raw config.json (GGUF: as transformers builds it)
    # > 1: a view for one of that many tensor-parallel ranks (for_rank): num_heads and num_kv_heads are
    # that rank's, and so are the KV cache sizes derived from them
    tensor_parallel_size: int = 1
    gguf_file: Path | None = None  # set when the weights come from this GGUF file

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """From a Hugging Face directory or a GGUF checkpoint (see resolve_model)."""
        files = resolve_model(path)
        hf = hf_config(path)
        if files.gguf_file is not None:
            return cls.from_hf(hf, gguf_file=files.gguf_file)
        extra_eos = []
        generation_config = files.path / "generation_config.json"
        if generation_config.exists():
            extra_eos = _as_list(json.loads(generation_config.read_text()).get("eos_token_id"))
        return cls.from_hf(hf, extra_eos)

    @classmethod
    def from_hf(cls, hf: dict, extra_eos: Sequence[int] = (), gguf_file: Path | None = None) -> "ModelConfig":
        """From an HF config dict; ``extra_eos``: generation_config.json's eos ids."""
        architecture = resolve_architecture(hf)
        num_layers, num_heads = _get(hf, "num_layers"), _get(hf, "num_heads")
        hidden_size = _get(hf, "hidden_size")
        eos = _as_list(hf.get("eos_token_id")) + list(extra_eos)
        return cls(
            architecture=architecture,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden_size // num_heads),
            hidden_size=hidden_size,
            vocab_size=int(hf["vocab_size"]),
            max_model_len=_get(hf, "max_model_len"),
            eos_token_ids=list(dict.fromkeys(eos)),
            sliding_window=_sliding_window(layer_windows(hf, num_layers)),
            hf_config=hf,
            gguf_file=gguf_file,
        )

    def for_rank(self, tensor_parallel_size: int) -> "ModelConfig":
        """The shapes one of ``tensor_parallel_size`` ranks holds: its share of the query heads and of the
        KV heads (one KV head per rank, replicated, when there are fewer KV heads than ranks). Raises
        ValueError when the heads do not split that way."""
        if self.tensor_parallel_size != 1:
            raise ValueError("for_rank() of a config that is already one rank's")
        if tensor_parallel_size == 1:
            return self
        tp = TPGroup(0, tensor_parallel_size)
        h0, h1 = tp.split(self.num_heads, "num_attention_heads")
        kv0, kv1 = tp.kv_heads(self.num_kv_heads)
        return replace(self, num_heads=h1 - h0, num_kv_heads=kv1 - kv0, tensor_parallel_size=tensor_parallel_size)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V one token takes in the cache, over all layers (of one rank's KV heads in a
        for_rank view)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize
