"""Scheduler process configuration: one frozen dataclass, validated on construction.

Sizes discovered at start (number of KV blocks, the model's context length) are not here: they arrive
in the workers' hello messages and are passed to the scheduler as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    block_size: int = 16
    max_num_seqs: int = 256  # sequences in one step
    max_num_batched_tokens: int = 2048  # tokens in one step (prefill chunks plus decodes)
    max_model_len: int | None = None  # cap below the model's own context length
    watermark: float = 0.01  # fraction of blocks kept free when admitting, to avoid instant preemption
    enable_prefix_caching: bool = True  # reuse cached full blocks of earlier requests' prefixes
    async_scheduling: bool = True  # plan step N+1 while the workers run step N, where the data allow

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two up to 128, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
