"""The scheduler's counters (EngineInfo's stats, the metrics): changed by the scheduler and its
Preemptor, read by the engine loop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0  # sequences preempted (recompute or swap)
    num_swap_preemptions: int = 0  # sequences preempted by swapping their group out
    num_computed_prompt_tokens: int = 0  # prompt tokens computed (not served from cache)
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_queried_prompt_tokens: int = 0  # prompt tokens looked up in the prefix cache, at every admission
    num_ahead_steps: int = 0  # steps planned ahead (Scheduler.schedule_ahead), before the previous step's results
