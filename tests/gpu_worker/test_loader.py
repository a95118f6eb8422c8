"""Checkpoint layouts (single / sharded, safetensors / .bin), streaming to a dtype, and slot coverage."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gpu_worker.loader import NN_LINEARS, checkpoint_files, load_model, relayout_linears
from gpu_worker.model_config import ModelConfig
from gpu_worker.models import get_model_class
from tests.factories import MODEL_CASES, make_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=2)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module | dict[str, torch.Tensor]):
    sa, sb = _state(a), b if isinstance(b, dict) else _state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_sharded_safetensors(llama_dir, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(checkpoint_files(tmp_path)) > 1
    sharded, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    single, _ = load_model(llama_dir, torch.device("cpu"), torch.float32)
    _assert_same_params(sharded, single)


def test_pytorch_bin_shards(llama_dir, tmp_path):
    weights = load_file(llama_dir / "model.safetensors")
    names = sorted(weights)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, part in halves.items():
        torch.save({n: weights[n] for n in part}, tmp_path / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    from_bin, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    single, _ = load_model(llama_dir, torch.device("cpu"), torch.float32)
    _assert_same_params(from_bin, single)


def test_single_pytorch_bin(llama_dir, tmp_path):
    torch.save(load_file(llama_dir / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    from_bin, _ = load_model(tmp_path, torch.device("cpu"), torch.float32)
    single, _ = load_model(llama_dir, torch.device("cpu"), torch.float32)
    _assert_same_params(from_bin, single)


def test_weights_cast_to_dtype(llama_dir):
    model, _ = load_model(llama_dir, torch.device("cpu"), torch.bfloat16)
    weights = load_file(llama_dir / "model.safetensors")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert model.layers[0].self_attn.rotary.cos_sin_cache.dtype == torch.bfloat16
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(model.layers[0].self_attn.qkv_proj.weight[: q.shape[0]], q.to(torch.bfloat16))


def test_tied_head_shares_the_embedding(tmp_path):
    model, _ = load_model(make_checkpoint(tmp_path, "qwen2"), torch.device("cpu"), torch.float32)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_relayout_keeps_values_and_shapes(llama_dir):
    """On CUDA the loader stores the MLP and LM head weights [in, out] (cuBLAS NN); same values, same
    shapes, same products; QKV / O keep [out, in]."""
    model, _ = load_model(llama_dir, torch.device("cpu"), torch.float32)
    before = _state(model)
    x = torch.randn(5, model.lm_head.weight.shape[1])
    logits = model.lm_head(x)
    assert relayout_linears(model) == 2 * len(model.layers) + 1
    _assert_same_params(model, before)
    for name, p in model.named_parameters():
        moved = name.rsplit(".", 2)[-2] in NN_LINEARS
        assert (p.stride() == (1, p.shape[0])) == moved, f"{name}: strides {p.stride()}"
    torch.testing.assert_close(model.lm_head(x), logits)
    assert relayout_linears(model) == 0  # already moved


def test_relayout_leaves_a_tied_head(tmp_path):
    model, _ = load_model(make_checkpoint(tmp_path, "qwen2"), torch.device("cpu"), torch.float32)
    relayout_linears(model)
    assert model.lm_head.weight is model.embed_tokens.weight and model.embed_tokens.weight.is_contiguous()


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_slots_cover_every_parameter_once(tmp_path, case):
    """Every row of every parameter is written by exactly one checkpoint tensor."""
    arch, overrides = MODEL_CASES[case]
    config = ModelConfig.from_dir(make_checkpoint(tmp_path, arch, num_hidden_layers=2, **overrides))
    with torch.device("meta"):
        model = get_model_class(config.hf_config).from_hf_config(config.hf_config)
    rows = {name: torch.zeros(p.shape[0], dtype=torch.int32) for name, p in model.named_parameters()}
    for slot in model.checkpoint_slots().values():
        start, stop = slot.rows or (0, len(rows[slot.param]))
        rows[slot.param][start:stop] += 1
    assert {name: r.unique().tolist() for name, r in rows.items() if not torch.all(r == 1)} == {}


@pytest.mark.parametrize(
    "arch, rename, extra",
    [
        # the OpenAI GPT-2 conversion: no "transformer." prefix, causal-mask buffers saved
        ("gpt2", lambda n: n.removeprefix("transformer."), {"h.0.attn.bias": torch.ones(1, 1, 4, 4)}),
        # checkpoints saved from OPTModel
        ("opt", lambda n: n.removeprefix("model."), {}),
        # the in-memory name of the NeoX head; old Pythia files carry rotary tables
        (
            "gpt_neox",
            lambda n: "lm_head.weight" if n == "embed_out.weight" else n,
            {"gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(2)},
        ),
    ],
)
def test_older_checkpoint_names(tmp_path, arch, rename, extra):
    model_dir = make_checkpoint(tmp_path / "new", arch, **{"n_layer" if arch == "gpt2" else "num_hidden_layers": 1})
    weights = {rename(n): w for n, w in load_file(model_dir / "model.safetensors").items()} | extra
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    torch.save(weights, old_dir / "pytorch_model.bin")
    (old_dir / "config.json").write_text((model_dir / "config.json").read_text())
    old, _ = load_model(old_dir, torch.device("cpu"), torch.float32)
    new, _ = load_model(model_dir, torch.device("cpu"), torch.float32)
    _assert_same_params(old, new)
