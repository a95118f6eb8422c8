"""Copy whole KV blocks (src -> dst) in every layer: the worker's half of copy-on-write."""

import torch


def copy_blocks_ref(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v), [num_blocks, block_size, H, D]
    src_block_ids: torch.Tensor,  # [num_copies] int64
    dst_block_ids: torch.Tensor,  # [num_copies] int64
) -> None:
    for k_cache, v_cache in kv_caches:
        k_cache[dst_block_ids] = k_cache[src_block_ids]
        v_cache[dst_block_ids] = v_cache[src_block_ids]


def copy_blocks(kv_caches, src_block_ids, dst_block_ids) -> None:
    copy_blocks_ref(kv_caches, src_block_ids, dst_block_ids)
