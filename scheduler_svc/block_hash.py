"""The hash that names a full KV block by its tokens and everything before them.

The scheduler's prefix cache keys blocks by it, and the gateways route a prompt by the hashes of its
first full blocks, so a prompt lands on the engine whose cache already holds them. Kept apart from the
scheduler core so that the gateway can import it (standard library only).
"""

from __future__ import annotations

import hashlib
from array import array

_NO_PARENT = bytes(16)


def hash_block(parent: int | None, token_ids: list[int]) -> int:
    """Hash of a full block: its tokens and, through the parent's hash, every token before it."""
    h = hashlib.blake2b(parent.to_bytes(16, "little") if parent is not None else _NO_PARENT, digest_size=16)
    h.update(array("I", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def extend_hashes(hashes: list[int], token_ids: list[int], block_size: int, num_blocks: int) -> list[int]:
    """``hashes`` (those of the first blocks of ``token_ids``, chained) extended in place to the first
    ``num_blocks`` full blocks; returns it."""
    for i in range(len(hashes), num_blocks):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[i * block_size : (i + 1) * block_size]))
    return hashes


def prefix_hashes(token_ids: list[int], block_size: int, max_blocks: int) -> list[int]:
    """The chained hashes of the first full blocks of ``token_ids``, at most ``max_blocks`` of them."""
    return extend_hashes([], token_ids, block_size, min(len(token_ids) // block_size, max_blocks))
