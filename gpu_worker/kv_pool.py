"""The paged KV pool: per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim], and a
CPU swap pool of the same layout. The worker runs the block operations a StepPlan names: swap-out,
swap-in, then copy-on-write copies, all before the forward pass.

An fp8 pool (``dtype`` float8_e4m3fn, --kv-cache-dtype fp8) holds one byte per element, so the same
memory holds twice the blocks of a bf16 pool; swaps and copies move its bytes (through uint8 views,
since CPU float8 tensors have no indexing), so they are the same operations for every dtype."""

from __future__ import annotations

import torch

from kernels.copy_blocks import copy_blocks


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        num_cpu_blocks: int = 0,
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.block_size = block_size
        self.device = device
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        # Swap space is written before it is read, so it needs no zeroing (untouched pages stay free).
        cpu_shape = (num_cpu_blocks, *shape[1:])
        pin = device.type == "cuda"
        self.cpu_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.empty(cpu_shape, dtype=dtype, pin_memory=pin), torch.empty(cpu_shape, dtype=dtype, pin_memory=pin))
            for _ in range(num_layers if num_cpu_blocks else 0)
        ]

    def swap_out(self, src_block_ids: list[int], dst_cpu_block_ids: list[int]) -> None:
        """Device blocks -> CPU blocks, every layer."""
        if not src_block_ids:
            return
        src = torch.tensor(src_block_ids, dtype=torch.long, device=self.device)
        dst = torch.tensor(dst_cpu_block_ids, dtype=torch.long)
        for cache, cpu_cache in zip(self._bytes(self.caches), self._bytes(self.cpu_caches), strict=True):
            for t, cpu_t in zip(cache, cpu_cache, strict=True):
                cpu_t.index_copy_(0, dst, t.index_select(0, src).cpu())

    def swap_in(self, src_cpu_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """CPU blocks -> device blocks, every layer."""
        if not src_cpu_block_ids:
            return
        src = torch.tensor(src_cpu_block_ids, dtype=torch.long)
        dst = torch.tensor(dst_block_ids, dtype=torch.long, device=self.device)
        for cache, cpu_cache in zip(self._bytes(self.caches), self._bytes(self.cpu_caches), strict=True):
            for t, cpu_t in zip(cache, cpu_cache, strict=True):
                t.index_copy_(0, dst, cpu_t.index_select(0, src).to(self.device, non_blocking=True))

    def copy(self, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """Copy-on-write: whole device blocks src -> dst, every layer."""
        if not src_block_ids:
            return
        src = torch.tensor(src_block_ids, dtype=torch.long, device=self.device)
        dst = torch.tensor(dst_block_ids, dtype=torch.long, device=self.device)
        copy_blocks(self._bytes(self.caches), src, dst)

    @staticmethod
    def _bytes(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not caches or caches[0][0].dtype != torch.float8_e4m3fn:
            return caches
        return [(k.view(torch.uint8), v.view(torch.uint8)) for k, v in caches]
