"""GGML tensor types to float32, in torch, on whatever device the raw bytes are.

Each quantized type stores a tensor row by row in blocks of ``block_size`` values packed into
``type_size`` bytes (``gguf.GGML_QUANT_SIZES``); a row is a whole number of blocks. The functions here
take the blocks as a uint8 tensor [num_blocks, type_size] and return [num_blocks, block_size] float32,
computing with the same float32 operations, in the same order, as the gguf package's numpy
dequantizers, so that the result is bit-identical to what transformers loads from the same file (it
dequantizes with gguf). Layouts are llama.cpp's (ggml-common.h); "d" is a float16 scale, "dmin" a
float16 minimum, "qs" the packed quants, "qh" their high bits.
"""

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # values per K-quant super-block


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of each block, as float32 [n, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _shifted(packed: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    """packed [n, g, m] uint8 -> [n, g, len(shifts), m]: each byte shifted right by each shift."""
    shift = torch.tensor(shifts, dtype=torch.uint8, device=packed.device).view(1, 1, -1, 1)
    return packed.unsqueeze(2) >> shift


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """qs [n, b] -> [n, 2b]: per group of ``group`` bytes, the low nibbles, then the high ones."""
    n = qs.shape[0]
    return (_shifted(qs.reshape(n, -1, group), [0, 4]) & 0x0F).reshape(n, -1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """packed [n, b] -> [n, 8b] single bits, little-endian (bit j of a b-byte integer at column j)."""
    n = packed.shape[0]
    return (_shifted(packed.reshape(n, -1, 1), list(range(8))) & 1).reshape(n, -1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:  # d, int8 qs[32]
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:  # d, qs[16]: value = d * (q - 8)
    q = _nibbles(blocks[:, 2:], 16).to(torch.int8) - 8
    return _f16(blocks, 0) * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:  # d, m, qs[16]: value = d * q + m
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:], 16).float() + _f16(blocks, 2)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:  # d, qh[4], qs[16]: value = d * (q - 16)
    q = _nibbles(blocks[:, 6:], 16) | (_bits(blocks[:, 2:6]) << 4)
    return _f16(blocks, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:  # d, m, qh[4], qs[16]: value = d * q + m
    q = _nibbles(blocks[:, 8:], 16) | (_bits(blocks[:, 4:8]) << 4)
    return _f16(blocks, 0) * q.float() + _f16(blocks, 2)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes [n, 12] -> 8 six-bit scales and 8 six-bit mins, each [n, 8]: bytes 0-3 hold
    scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes 4-7 the same for the mins, bytes 8-11
    the low nibbles of scales 4-7 (low) and mins 4-7 (high)."""
    s = scales.reshape(-1, 3, 4)
    lo_d, lo_m, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([lo_d & 0x3F, (hi & 0x0F) | ((lo_d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:  # d, dmin, scales[12], qs[128]; 8 sub-blocks of 32
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).view(n, 8, 1)
    q = _nibbles(blocks[:, 16:], 32).view(n, 8, 32).float()
    return (d * q - dm).view(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:  # d, dmin, scales[12], qh[32], qs[128]
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).view(n, 8, 1)
    low = _nibbles(blocks[:, 48:], 32).view(n, 8, 32)
    high = (_shifted(blocks[:, 16:48].reshape(n, 1, 32), list(range(8))) & 1).view(n, 8, 32)  # bit j: sub-block j
    return (d * (low | (high << 4)).float() - dm).view(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:  # ql[128], qh[64], int8 scales[16], d; 16 sub-blocks of 16
    n = blocks.shape[0]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(blocks, 208) * scales).view(n, 16, 1)
    low = _nibbles(blocks[:, :128], 64).view(n, 8, 32)
    high = (_shifted(blocks[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6]) & 0x03).view(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).view(n, 16, 16).float()
    return (d * q).view(n, QK_K)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:  # scales[16] (scale | min << 4), qs[64], d, dmin
    n = blocks.shape[0]
    scales = blocks[:, :16]
    dl = (_f16(blocks, 80) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(blocks, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = (_shifted(blocks[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6]) & 0x03).view(n, 16, 16).float()
    return (dl * q - ml).view(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:  # hmask[32], qs[64], scales[12], d; 16 sub-blocks of 16
    n = blocks.shape[0]
    scales = blocks[:, 96:108]
    # 16 six-bit scales: low nibbles from bytes 0-7 (low then high halves), top 2 bits from bytes 8-11
    low = (_shifted(scales[:, :8].reshape(n, 1, 8), [0, 4]) & 0x0F).view(n, 16)
    high = (_shifted(scales[:, 8:].reshape(n, 1, 4), [0, 2, 4, 6]) & 0x03).view(n, 16)
    dl = (_f16(blocks, 108) * ((low | (high << 4)).to(torch.int8) - 32).float()).view(n, 16, 1)
    ql = (_shifted(blocks[:, 32:96].reshape(n, 2, 32), [0, 2, 4, 6]) & 0x03).view(n, 16, 16)
    hmask = (_shifted(blocks[:, :32].reshape(n, 1, 32), list(range(8))) & 1).view(n, 16, 16)
    q = (ql.to(torch.int8) - ((hmask ^ 1) << 2).to(torch.int8)).float()  # a set mask bit means no -4
    return (dl * q).view(n, QK_K)


_BLOCK_DEQUANT: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q2_K: _q2_k,
    GGMLQuantizationType.Q3_K: _q3_k,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = _FLOAT_TYPES + tuple(_BLOCK_DEQUANT)


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor's data as the gguf reader gives it (float32 / float16 values for F32 / F16, else its
    bytes as uint8) -> float32 of ``shape`` (torch order: the GGML dimensions reversed).

    Raises ValueError for a type outside SUPPORTED_TYPES.
    """
    if qtype == GGMLQuantizationType.F32:
        out = raw.float()
    elif qtype == GGMLQuantizationType.F16:
        out = raw.view(torch.float16).float()
    elif qtype == GGMLQuantizationType.BF16:  # the high half of a float32: widening is exact
        out = raw.contiguous().view(torch.uint8).view(torch.bfloat16).float()
    elif qtype in _BLOCK_DEQUANT:
        type_size = GGML_QUANT_SIZES[qtype][1]
        out = _BLOCK_DEQUANT[qtype](raw.contiguous().view(torch.uint8).reshape(-1, type_size))
    else:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"GGML type {qtype.name} cannot be dequantized (supported: {supported})")
    return out.reshape(shape)
