"""SchedulerCounters: the scheduler's running totals, updated by its parts, reported by ``get_stats``."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class SchedulerCounters:
    """Totals since start (the prompt/cache pair since the last flush). Mutable and shared: the batch
    builder counts admissions and retractions, output processing counts generated tokens."""

    total_prompt_tokens: int = 0
    total_cached_tokens: int = 0
    total_generated: int = 0
    total_computed_prompt_tokens: int = 0  # prompt positions the model computed (not served from the cache)
    total_computed_tokens: int = 0  # every position computed: prompts, decodes, jump-forward runs
    num_forward: int = 0
    num_retracted: int = 0
    num_failed: int = 0  # requests ended by an exception while processing them (the engine went on)
    total_loaded_tokens: int = 0  # prefix tokens loaded from the KV tiers (host, disk) at admission
    num_load_deferred: int = 0  # admissions put off because a tier load would not fit in the pool
    # (monotonic time, total_generated) samples; the throughput is measured over this window
    tput_window: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def mark(self) -> None:
        """Record a throughput sample now."""
        self.tput_window.append((time.monotonic(), self.total_generated))

    def throughput(self) -> float:
        """Generated tokens per second over the window (adds a sample now)."""
        self.mark()
        now, _ = self.tput_window[-1]
        t0, g0 = self.tput_window[0]
        return (self.total_generated - g0) / (now - t0) if now > t0 else 0.0
