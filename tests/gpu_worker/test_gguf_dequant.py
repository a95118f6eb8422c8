"""GGML dequantization in torch: bit-identical to the gguf package's numpy dequantizers (what
transformers loads with), per type, on CPU and (gpu marker) on CUDA."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES

from gpu_worker.gguf_dequant import SUPPORTED_TYPES, dequantize
from tests.gguf_files import QUANTIZABLE, Q, random_blocks

ROWS, COLS = 6, 512  # two K-quant super-blocks per row, 16 blocks of 32


def _raw(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """A [ROWS, COLS] tensor as the gguf reader hands it: values for F32/F16, bytes otherwise."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
        return gguf.quants.quantize(values, qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return random_blocks(qtype, ROWS * COLS // block_size, rng).reshape(ROWS, COLS // block_size * type_size)


def _ours(raw: np.ndarray, qtype: Q, device: str = "cpu") -> np.ndarray:
    return dequantize(torch.from_numpy(raw.copy()).to(device), qtype, (ROWS, COLS)).cpu().numpy()


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_equals_gguf_dequantize(qtype):
    raw = _raw(qtype, np.random.default_rng(int(qtype)))
    want = gguf.quants.dequantize(raw, qtype)
    got = _ours(raw, qtype)
    assert got.dtype == np.float32 and got.shape == want.shape == (ROWS, COLS)
    assert np.isfinite(want).all() and np.abs(want).max() > 0  # scales are finite, values not all zero
    assert np.array_equal(got, want)


def test_required_types_are_supported():
    required = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K}
    assert required <= set(SUPPORTED_TYPES)


# Largest error of quantize-then-dequantize, in quantization steps of the block's absolute maximum
# (the step is absmax / 127 for Q8_0, (max - min) / 15 for Q4_1, ...): half a step of rounding, plus
# the one-step clip at the edge of the symmetric types.
_STEP = {Q.BF16: 2**-8, Q.F16: 2**-11, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q4_1: 2 / 15, Q.Q5_0: 1 / 16,
         Q.Q5_1: 2 / 31}


@pytest.mark.parametrize("qtype", [t for t in QUANTIZABLE if t != Q.F32], ids=lambda t: t.name)
def test_round_trip_of_gguf_quantize(qtype):
    """The layouts mean what llama.cpp says: values quantized by gguf come back within a step, checked
    without gguf's dequantizer."""
    values = np.random.default_rng(1).standard_normal((ROWS, COLS)).astype(np.float32)
    got = _ours(gguf.quants.quantize(values, qtype), qtype)
    absmax = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True)
    err = np.abs(got - values).reshape(-1, 32)
    assert (err <= _STEP[qtype] * absmax).all(), f"max error {(err / absmax).max():.4f} of absmax"


def test_unsupported_type_is_named():
    raw = torch.zeros(ROWS, COLS // 32 * 18, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"GGML type IQ4_NL cannot be dequantized \(supported: F32, F16, BF16"):
        dequantize(raw, Q.IQ4_NL, (ROWS, COLS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_cuda_equals_gguf_dequantize(qtype):
    raw = _raw(qtype, np.random.default_rng(int(qtype)))
    assert np.array_equal(_ours(raw, qtype, "cuda"), gguf.quants.dequantize(raw, qtype))
