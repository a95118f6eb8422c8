"""What every attention layer needs to know about the step's batch, built once per step by the runner."""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Layout of one step's flattened varlen batch: sequence s owns tokens
    ``query_start_loc[s]:query_start_loc[s+1]``, which are the last tokens of its context."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, block_id * block_size + offset; -1 = padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length including this step's tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    max_seq_len: int
