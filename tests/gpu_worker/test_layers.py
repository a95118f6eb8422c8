"""Rotary tables against transformers', and the config forms they are read from."""

import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from gpu_worker.models.layers import RopeParams, RotaryEmbedding, get_activation, layer_windows
from tests.factories import LLAMA3_ROPE

MAX_POS = 300


def _hf_cos_sin(rotary: torch.nn.Module) -> torch.Tensor:  # [MAX_POS, rotary_dim] = cat(cos, sin)
    positions = torch.arange(MAX_POS)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return torch.cat((cos[0, :, :half], sin[0, :, :half]), dim=-1)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "default", "rope_theta": 1000000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        LLAMA3_ROPE,
    ],
    ids=["default", "theta1e6", "linear", "llama3"],
)
def test_llama_rotary_matches_transformers(rope):
    hf = LlamaConfig(
        hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=MAX_POS, rope_parameters=dict(rope)
    )
    ours = RotaryEmbedding(RopeParams.from_hf(hf.to_dict(), head_dim=16), MAX_POS)
    torch.testing.assert_close(ours.cos_sin_cache, _hf_cos_sin(LlamaRotaryEmbedding(hf)), rtol=0, atol=1e-6)


def test_neox_partial_rotary_matches_transformers():
    hf = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=MAX_POS, rotary_pct=0.5)
    params = RopeParams.from_hf(hf.to_dict(), head_dim=16, default_partial=0.25)
    assert params.rotary_dim == 8
    ours = RotaryEmbedding(params, MAX_POS)
    torch.testing.assert_close(ours.cos_sin_cache, _hf_cos_sin(GPTNeoXRotaryEmbedding(hf)), rtol=0, atol=1e-6)


def test_rope_config_forms_agree():
    """transformers 5 writes rope_parameters; older config.json files rope_theta + rope_scaling."""
    new = {"max_position_embeddings": 1024, "rope_parameters": dict(LLAMA3_ROPE)}
    old_scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_theta", "rope_type")}
    old = {"max_position_embeddings": 1024, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **old_scaling}}
    assert RopeParams.from_hf(new, 16) == RopeParams.from_hf(old, 16)
    # NeoX's own keys, and its default of a quarter of the head rotating
    assert RopeParams.from_hf({"rotary_pct": 0.5, "rotary_emb_base": 500.0}, 16) == RopeParams(500.0, 8)
    assert RopeParams.from_hf({}, 16, default_partial=0.25) == RopeParams(10000.0, 4)


def test_unsupported_rope_type_is_an_error():
    with pytest.raises(ValueError, match="yarn"):
        RopeParams.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, 16)


def test_layer_windows():
    assert layer_windows({"model_type": "mistral", "sliding_window": 8}, 2) == (8, 8)
    assert layer_windows({"model_type": "mistral", "sliding_window": None}, 2) == ()
    assert layer_windows({"model_type": "llama", "sliding_window": 8}, 2) == ()
    qwen = {"model_type": "qwen2", "sliding_window": 8, "max_window_layers": 1}
    assert layer_windows(qwen, 3) == ()  # use_sliding_window is off
    assert layer_windows({**qwen, "use_sliding_window": True}, 3) == (None, 8, 8)


def test_gelu_new_is_the_tanh_formula():
    x = torch.linspace(-6, 6, 101)
    tanh_formula = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(get_activation("gelu_new")(x), tanh_formula)
    with pytest.raises(ValueError, match="gelu_new"):
        get_activation("swish2")
