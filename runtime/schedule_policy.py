"""Which waiting requests to admit next, and how many tokens of each fit.

Policies (``schedule_policy``):
  * ``lpm``: longest cached prefix first, so requests that hit the radix cache run together while
    their prefix is still resident. With aging (below).
  * ``dfs-weight``: depth-first over the radix tree, heavier subtrees (more waiting requests) first.
  * ``fcfs``: arrival order. ``lof``: longest output (max_new_tokens) first. ``random``: seeded shuffle.

Aging (all policies): a request that has waited ``lpm_aging_steps`` scheduler steps jumps to the
front, oldest first, and nothing behind it is admitted until it is. So a cache-cold request waits at
most ``lpm_aging_steps`` steps plus the steps needed to free memory for it.

Priority (``--enable-priority-scheduling``, SGLang's request field ``priority``): among the requests
that are not aged, higher values are admitted first (lower first with
``--schedule-low-priority-values-first``); a request without one takes ``--default-priority-value``,
else it comes after every request that has one. Within one priority the policy's order holds (the sort
is stable). Aging stays above priority: an aged request goes to the front whatever its priority, so
a low priority means "later", never "never": the starvation bound above holds for every request.
Without the flag the field is ignored (or refused, ``--abort-on-priority-when-disabled``). Running
requests are never preempted for a higher priority.

Above ``lpm_fallback_queue_len`` waiting requests, ``lpm`` and ``dfs-weight`` fall back to ``fcfs``:
matching every queued prompt against the tree each step costs more than it saves.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from radixlm.runtime.radix_cache import RadixCache, TreeNode
from radixlm.runtime.req import Req


@dataclass(frozen=True)
class Priority:
    """How the ``priority`` field orders admission (SGLang's flags); ``enabled`` False: it is ignored."""

    enabled: bool = False
    low_first: bool = False
    default: int | None = None

    @classmethod
    def from_args(cls, args: Any) -> "Priority":
        return cls(args.enable_priority_scheduling, args.schedule_low_priority_values_first,
                   args.default_priority_value)

    def key(self, req: Req) -> tuple[int, int]:
        """Sort key: requests with a priority first, by value in the flag's direction."""
        p = req.priority if req.priority is not None else self.default
        if p is None:
            return (1, 0)
        return (0, p if self.low_first else -p)


class SchedulePolicy:
    def __init__(
        self,
        policy: str,
        cache: RadixCache,
        aging_steps: int,
        fallback_queue_len: int,
        seed: int = 0,
        priority: Priority = Priority(),
    ):
        self.policy = policy
        self.cache = cache
        self.aging_steps = aging_steps
        self.fallback_queue_len = fallback_queue_len
        self.rng = random.Random(seed)
        self.priority = priority

    def is_aged(self, req: Req, step: int) -> bool:
        return step - req.arrival >= self.aging_steps

    def order(self, waiting: list[Req], step: int) -> list[Req]:
        """Return the waiting requests in admission order (aged ones first, oldest first; then, with priority
        scheduling, by priority; then by the policy)."""
        aged = sorted((r for r in waiting if self.is_aged(r, step)), key=lambda r: r.arrival)
        rest = [r for r in waiting if not self.is_aged(r, step)]
        policy = self.policy
        if policy in ("lpm", "dfs-weight") and (len(waiting) > self.fallback_queue_len or self.cache.disable):
            policy = "fcfs"
        if policy == "lpm":
            for r in rest:
                r.prefix_len = self.cache.match_prefix(r.all_ids[: r.max_prefix_len], r.cache_namespace).total_len  # any tier
            rest.sort(key=lambda r: (-r.prefix_len, r.arrival))
        elif policy == "dfs-weight":
            rest = self._dfs_weight(rest)
        elif policy == "lof":
            rest.sort(key=lambda r: (-r.sampling_params.max_new_tokens, r.arrival))
        elif policy == "random":
            self.rng.shuffle(rest)
        else:
            rest.sort(key=lambda r: r.arrival)
        if self.priority.enabled:
            rest.sort(key=self.priority.key)  # stable: the policy's order within one priority
        return aged + rest

    def _dfs_weight(self, reqs: list[Req]) -> list[Req]:
        at_node: dict[TreeNode, list[Req]] = defaultdict(list)
        for r in sorted(reqs, key=lambda r: r.arrival):
            at_node[self.cache.match_prefix(r.all_ids[: r.max_prefix_len], r.cache_namespace).last_node].append(r)
        weight: dict[TreeNode, int] = defaultdict(int)
        for node, rs in at_node.items():
            n = node
            while n is not None:
                weight[n] += len(rs)
                n = n.parent
        out: list[Req] = []
        stack = [self.cache.root]
        while stack:
            node = stack.pop()
            out.extend(at_node.get(node, ()))
            kids = sorted((c for c in node.children.values() if weight[c] > 0), key=lambda c: weight[c])
            stack.extend(kids)  # heaviest pushed last → visited first
        return out
