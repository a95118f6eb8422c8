"""Copy whole KV blocks (src -> dst) in every layer: the worker's half of copy-on-write."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kernels._triton import cdiv, jit, use_triton

if TYPE_CHECKING:
    import triton.language as tl


def copy_blocks_ref(
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v), [num_blocks, block_size, H, D]
    src_block_ids: torch.Tensor,  # [num_copies] int64
    dst_block_ids: torch.Tensor,  # [num_copies] int64
) -> None:
    for k_cache, v_cache in kv_caches:
        k_cache[dst_block_ids] = k_cache[src_block_ids]
        v_cache[dst_block_ids] = v_cache[src_block_ids]


@jit()  # block_numel stays specialized: its divisibility by 16 makes the copies 16 bytes wide
def _copy_blocks_kernel(
    base_ptr,  # the first cache; every cache is addressed from it
    cache_offsets_ptr,  # [num_caches] int64, element offset of each cache from base_ptr
    src_ptr,  # [num_copies] block ids
    dst_ptr,  # [num_copies] block ids
    block_numel,  # elements per block: block_size * num_kv_heads * head_dim
    CHUNK: tl.constexpr,  # elements per program
):
    pair = tl.program_id(0)
    cache = tl.load(cache_offsets_ptr + tl.program_id(1))
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    offs = tl.program_id(2) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    x = tl.load(base_ptr + cache + src * block_numel + offs, mask=mask)
    tl.store(base_ptr + cache + dst * block_numel + offs, x, mask=mask)


# (device, data pointers) -> offsets tensor: the caches live for the worker's life, so the host-to-device
# copy of the offsets happens once, not on every call.
_offsets_cache: dict[tuple, torch.Tensor] = {}


def _cache_offsets(caches: list[torch.Tensor]) -> torch.Tensor:
    ptrs = tuple(c.data_ptr() for c in caches)
    key = (caches[0].device, ptrs)
    offsets = _offsets_cache.get(key)
    if offsets is None:
        size = caches[0].element_size()
        if any(p % size for p in ptrs):
            raise ValueError("cache data pointers are not aligned to the element size")
        offsets = torch.tensor([(p - ptrs[0]) // size for p in ptrs], dtype=torch.int64,
                               device=caches[0].device)
        _offsets_cache.clear()
        _offsets_cache[key] = offsets
    return offsets


def copy_blocks_triton(kv_caches, src_block_ids, dst_block_ids) -> None:
    """The Triton path (CPU tensors run under TRITON_INTERPRET=1): one launch for all layers.

    Copies run in parallel, so no block may be both a source and a destination, and destinations must
    be distinct (true for copy-on-write: destinations are fresh blocks)."""
    caches = [c for kv in kv_caches for c in kv]
    if not caches:
        return
    first = caches[0]
    for c in caches:
        if c.shape != first.shape or c.dtype != first.dtype or c.device != first.device \
                or not c.is_contiguous():
            raise ValueError(f"caches must be contiguous and alike: {c.dtype} {tuple(c.shape)} on {c.device} "
                             f"vs {first.dtype} {tuple(first.shape)} on {first.device}")
    num_copies = src_block_ids.shape[0]
    for name, t in (("src_block_ids", src_block_ids), ("dst_block_ids", dst_block_ids)):
        if t.dtype not in (torch.int32, torch.int64) or t.shape != (num_copies,) or t.device != first.device:
            raise ValueError(f"{name} must be int32/int64 [{num_copies}] on {first.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if num_copies == 0:
        return
    block_numel = first[0].numel()
    chunk = 4096
    grid = (num_copies, len(caches), cdiv(block_numel, chunk))
    _copy_blocks_kernel[grid](first, _cache_offsets(caches), src_block_ids.contiguous(),
                              dst_block_ids.contiguous(), block_numel, CHUNK=chunk, num_warps=4)


def copy_blocks(kv_caches, src_block_ids, dst_block_ids) -> None:
    if kv_caches and use_triton(kv_caches[0][0]):
        copy_blocks_triton(kv_caches, src_block_ids, dst_block_ids)
    else:
        copy_blocks_ref(kv_caches, src_block_ids, dst_block_ids)
