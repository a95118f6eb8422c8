"""RMSNorm with an optional fused residual add."""

import torch


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual); with a residual, the input is x + residual and so is new_residual.

    Rounding follows transformers' LlamaRMSNorm: statistics in fp32, scale by weight after the cast.
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rms_norm(x, weight, eps, residual=None):
    return rms_norm_ref(x, weight, eps, residual)
