"""Prompt log probabilities: the log-softmax of the logits at prompt positions, for the sequences that
ask (vLLM's prompt_logprobs; OpenAI's echo with logprobs).

The logits at position p predict token p + 1, so a prefill chunk covering positions [start, end) of a
prompt of P tokens yields the logprobs of prompt tokens start + 1 .. min(end, P - 1); position P - 1
predicts the first output and is the usual sampling row. Only the rows of sequences that ask go
through the LM head: requests that do not ask cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gpu_worker.step_io import PromptLogprobs, StepOutput


@dataclass(slots=True)
class PromptRows:
    """Where the asked-for prompt positions sit in a step's flattened batch."""

    indices: list[int] = field(default_factory=list)  # flattened token index of each row
    targets: list[int] = field(default_factory=list)  # the prompt token each row predicts
    # Per sequence: (seq_id, first prompt position predicted, number of rows, alternatives asked).
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.indices)

    def add_to(self, result: StepOutput, logits: torch.Tensor) -> None:
        """Appends each sequence's PromptLogprobs to ``result``; ``logits``: [len(indices), vocab]."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.tensor(self.targets, device=logprobs.device, dtype=torch.long)
        token_lp = logprobs.gather(1, targets[:, None])  # [rows, 1]
        ranks = (logprobs > token_lp).sum(dim=-1) + 1
        k = max(span[3] for span in self.spans)
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        token_lp_h, ranks_h = token_lp[:, 0].tolist(), ranks.tolist()
        top_lp_h = top_lp.tolist() if k else None
        top_ids_h = top_ids.tolist() if k else None
        row = 0
        for seq_id, first, n, want in self.spans:
            top = [(top_ids_h[j][:want], top_lp_h[j][:want]) for j in range(row, row + n)] if want else []
            result.prompt_logprobs.append(PromptLogprobs(seq_id, first, token_lp_h[row:row + n],
                                                         ranks_h[row:row + n], top))
            row += n


def prompt_logprob_rows(batch: list) -> PromptRows:
    """The rows of ``batch`` ((SeqState, num_scheduled_tokens) in batch order, before the step advances
    num_computed_tokens) whose logits give prompt logprobs that their sequences asked for."""
    rows = PromptRows()
    t = 0
    for state, n in batch:
        want = state.params.prompt_logprobs
        start = state.num_computed_tokens
        end = min(start + n, state.num_prompt_tokens - 1)  # the last prompt position predicts an output
        if want is not None and start < end:
            rows.indices.extend(range(t, t + end - start))
            rows.targets.extend(state.token_ids[start + 1:end + 1])
            rows.spans.append((state.seq_id, start + 1, end - start, want))
        t += n
    return rows
