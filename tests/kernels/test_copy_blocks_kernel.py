"""copy_blocks: Triton kernel against the PyTorch reference, interpreted on CPU and compiled on GPU."""

import pytest
import torch

from kernels.copy_blocks import copy_blocks_ref, copy_blocks_triton


def check(device, seed, num_layers, num_blocks, block_size, num_kv_heads, head_dim, num_copies, dtype):
    g = torch.Generator(device).manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [(torch.randn(shape, generator=g, device=device).to(dtype),
               torch.randn(shape, generator=g, device=device).to(dtype)) for _ in range(num_layers)]
    ids = torch.randperm(num_blocks, generator=g, device=device)
    src, dst = ids[:num_copies], ids[num_copies:2 * num_copies]  # disjoint, as copy-on-write makes them
    expected = [(k.clone(), v.clone()) for k, v in caches]
    copy_blocks_ref(expected, src, dst)
    copy_blocks_triton(caches, src, dst)
    for (k, v), (k_ref, v_ref) in zip(caches, expected, strict=True):
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_blocks(interpreter, seed, dtype):
    check(interpreter, seed, num_layers=3, num_blocks=10, block_size=8, num_kv_heads=2, head_dim=80,
          num_copies=4, dtype=dtype)


def test_copy_blocks_int32_ids_and_nothing_to_copy(interpreter, seed):
    check(interpreter, seed, num_layers=2, num_blocks=6, block_size=16, num_kv_heads=1, head_dim=64,
          num_copies=0, dtype=torch.float16)
    caches = [(torch.zeros(4, 2, 1, 8), torch.ones(4, 2, 1, 8))]
    copy_blocks_triton(caches, torch.tensor([3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    assert torch.equal(caches[0][1][0], caches[0][1][3]) and caches[0][0].abs().sum() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_gpu_copy_blocks(cuda, seed, block_size):
    check(cuda, seed, num_layers=32, num_blocks=4096 // block_size, block_size=block_size, num_kv_heads=8,
          head_dim=128, num_copies=7, dtype=torch.bfloat16)
