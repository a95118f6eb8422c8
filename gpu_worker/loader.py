"""Load a Hugging Face checkpoint directory into one of our models.

The model is built on the meta device (no memory, no random init), given empty parameters on the
target device and dtype, then filled tensor by tensor as the checkpoint files are read: peak memory is
the model plus one checkpoint tensor. A tensor-parallel rank builds only its shard of the model and reads
only its shard of each safetensors tensor (a lazy slice), never the whole tensor.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from gpu_worker.fp8 import fp8_scheme, prepare_fp8_checkpoint, quantize_linears
from gpu_worker.model_config import ModelConfig
from gpu_worker.models import get_model_class
from gpu_worker.models.parallel import SINGLE, TPGroup

# Checkpoint layouts in order of preference: (sharded index, single file).
_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint: a sharded index's files, or the single file."""
    for index_name, single_name in _LAYOUTS:
        if (model_dir / index_name).exists():
            weight_map = json.loads((model_dir / index_name).read_text())["weight_map"]
            return [model_dir / name for name in sorted(set(weight_map.values()))]
        if (model_dir / single_name).exists():
            return [model_dir / single_name]
    looked_for = ", ".join(name for layout in _LAYOUTS for name in layout)
    raise FileNotFoundError(f"no weights in {model_dir} (looked for {looked_for})")


def iter_weights(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, one at a time. Safetensors come as lazy slices read
    onto ``device`` (the model's slots read all of a tensor or one rank's shard of it: layers.load_slots),
    pickled .bin files (weights_only) as memory-mapped CPU tensors."""
    num_tensors = None
    if all(f.suffix == ".safetensors" for f in files):
        num_tensors = 0
        for f in files:
            with safe_open(f, framework="pt") as reader:
                num_tensors += len(reader.keys())
    with tqdm(total=num_tensors, desc="loading weights", unit="tensor", disable=None) as bar:
        for f in files:
            if f.suffix == ".safetensors":
                with safe_open(f, framework="pt", device=str(device)) as reader:
                    for name in reader.keys():
                        yield name, reader.get_slice(name)
                        bar.update()
            else:
                state_dict = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                for name, tensor in state_dict.items():
                    yield name, tensor
                    bar.update()
                del state_dict


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give a meta-device model uninitialized parameters on ``device`` / ``dtype`` (tied parameters stay
    one tensor) and recompute its derived buffers (rotary tables) there."""
    new_params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        own = getattr(module, "param_dtypes", {})  # fp8 weights and their fp32 scales (gpu_worker/fp8.py)
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in new_params:
                empty = torch.empty(param.shape, device=device, dtype=own.get(name, dtype))
                new_params[id(param)] = nn.Parameter(empty, requires_grad=False)
            setattr(module, name, new_params[id(param)])
        if hasattr(module, "init_buffers"):
            module.init_buffers(device, dtype)
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise RuntimeError(f"buffer {name} has no init_buffers() to build it after loading")


def fill_random(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random normal weights, norm scales at 1: for benchmarks of real shapes without a checkpoint."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.data.fill_(1.0 if name.endswith("weight") else 0.0)  # norm scales 1, biases 0
        else:
            param.data.normal_(0.0, std, generator=gen)


def load_model(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype, load_format: str = "auto", tp: TPGroup = SINGLE,
    quantization: str = "none", fp8_lm_head: bool = False,
) -> tuple[nn.Module, ModelConfig]:
    """Build the model that config.json names (``tp``: this rank's shard of it) and fill it from the
    checkpoint's weights. The ModelConfig returned describes the whole model (``for_rank``: one rank's).

    Raises ValueError for an unsupported architecture (listing the supported ones) or a checkpoint that
    lacks a weight (naming it), FileNotFoundError when the directory holds no weights.

    ``quantization="fp8"`` quantizes the linears to e4m3 after loading (the LM head too if
    ``fp8_lm_head``); a compressed-tensors FP8 checkpoint loads its e4m3 weights as they are (gpu_worker/fp8.py).
    """
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    model_class = get_model_class(config.hf_config)
    scheme = fp8_scheme(config.hf_config) if load_format != "dummy" else None
    with torch.device("meta"):
        model = model_class.from_hf_config(config.hf_config, tp)
        if scheme is not None:
            prepare_fp8_checkpoint(model, lm_head=scheme[1])
    materialize(model, device, dtype)
    if load_format == "dummy":  # config.json alone: random weights of the real shape
        fill_random(model)
    elif config.gguf_file is not None:  # a GGUF checkpoint: dequantized, HF-named tensors
        from gpu_worker.gguf_loader import iter_gguf_weights

        model.load_weights(iter_gguf_weights(config.gguf_file, config.hf_config, device))
    else:
        model.load_weights(iter_weights(checkpoint_files(model_dir), device))
    if scheme is None and quantization == "fp8":
        quantize_linears(model, lm_head=fp8_lm_head)
    if device.type == "cuda":
        relayout_linears(model)
    return model.eval(), config


# Linears that cuBLAS runs faster on an H100 with the weight stored [in, out] (an "NN" GEMM) than
# [out, in] ("TN"), measured at the Llama-3-8B shapes (kernels/NOTES.md v10): the gated MLP's
# gate/up and down projections (3-5% at decode batch sizes, 3.5% for gate/up at 8192 tokens) and the
# LM head (1.5-10%). QKV is slower that way (+9% at batch 256) and O unchanged, so they stay.
NN_LINEARS = ("gate_up_proj", "down_proj", "lm_head")


def relayout_linears(model: nn.Module, names: tuple[str, ...] = NN_LINEARS) -> int:
    """Stores the weights of the linears called ``names`` transposed in memory, keeping their shape:
    ``weight`` becomes a [out, in] view with strides (1, out), which F.linear hands to cuBLAS as an NN
    product. Weights tied to an embedding keep their layout (row gathers want rows contiguous).
    Returns the number of linears changed."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    changed = 0
    for name, module in model.named_modules():
        if (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names
                and id(module.weight) not in tied and module.weight.stride(1) == 1):
            module.weight = nn.Parameter(module.weight.detach().t().contiguous().t(), requires_grad=False)
            changed += 1
    return changed
