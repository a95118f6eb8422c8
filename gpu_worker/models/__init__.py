"""Model families and the architecture registry.

Every model class has the same surface, which is all the runner and the loader use:

    Model.from_hf_config(hf_config: dict) -> Model          # builds on the current default device
    model(input_ids, positions, kv_caches, attn_meta)        # [T], [T], per layer (k, v) -> [T, hidden]
    model.compute_logits(hidden)                             # [n, hidden] -> [n, vocab] in the model dtype
    model.load_weights(weights: Iterable[(name, tensor)])    # raises ValueError naming missing tensors
"""

from torch import nn

from gpu_worker.models.gpt2 import GPT2LMHeadModel
from gpu_worker.models.gpt_neox import GPTNeoXForCausalLM
from gpu_worker.models.llama import LlamaForCausalLM
from gpu_worker.models.opt import OPTForCausalLM

# HF architecture name -> our class. Mistral and Qwen2/3 are Llama variants (see llama.py).
_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}

# config.json model_type -> architecture, for configs without an ``architectures`` list.
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "opt": "OPTForCausalLM",
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)


def resolve_architecture(hf_config: dict) -> str:
    """The first supported name in ``architectures``, else the one ``model_type`` implies."""
    names = list(hf_config.get("architectures") or [])
    for name in names:
        if name in _ARCHITECTURES:
            return name
    model_type = hf_config.get("model_type")
    if not names and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    raise ValueError(
        f"unsupported architecture {names or [model_type]}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def get_model_class(hf_config: dict) -> type[nn.Module]:
    return _ARCHITECTURES[resolve_architecture(hf_config)]


__all__ = ["SUPPORTED_ARCHITECTURES", "get_model_class", "resolve_architecture"]
