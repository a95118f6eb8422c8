"""Rotary position embedding applied in place to the first rotary_dim channels of q and k."""

import torch


def apply_rotary_ref(
    positions: torch.Tensor,  # [num_tokens] int64
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim]: cos in the first half, sin in the second
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox style rotates the two halves of the rotary channels; GPT-J style rotates even/odd pairs."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (q, k):
        rot = x[..., :rotary_dim]
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1 = (x1.float() * cos - x2.float() * sin).to(x.dtype)
        o2 = (x2.float() * cos + x1.float() * sin).to(x.dtype)
        if is_neox:
            rot.copy_(torch.cat((o1, o2), dim=-1))
        else:
            rot.copy_(torch.stack((o1, o2), dim=-1).flatten(-2))
    return q, k


def apply_rotary(positions, q, k, cos_sin_cache, is_neox=True):
    return apply_rotary_ref(positions, q, k, cos_sin_cache, is_neox)
