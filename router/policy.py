"""Routing policies: which worker gets a request. Pure logic over ``Candidate``s (a worker's load and
its approximate prefix tree), shared by the standalone router and ``radixlm serve --dp-size``.

``cache_aware`` is SGLang's rule (sgl-router), plus Preble-style spreading of hot prefixes:

1. **Imbalanced** (the busiest worker has more than ``balance_abs_threshold`` requests over the idlest
   AND more than ``balance_rel_threshold`` times as many): the least loaded worker, whatever the cache.
2. Otherwise the worker whose tree matches most of the prompt. If that match covers more than
   ``cache_threshold`` of the prompt, it goes there (workers within 5% of the best match count as equal,
   and the least loaded of them wins, so a prefix cached on two workers is shared between them).
   **Spreading**: when that worker already has ``spread_threshold`` requests in flight and another
   has at most half as many, the prefix is copied to the other (Preble: a hot prefix gets a second
   home instead of a queue).
3. A prompt that matches nowhere well enough goes to the worker with the smallest tree (the most room
   for a new prefix), the least loaded among equals.

The chosen worker's tree then holds the prompt. The other policies ignore the trees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from radixlm.router.prefix_tree import ApproxPrefixTree

POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")


class Candidate(Protocol):
    """What a policy reads of a worker."""

    @property
    def load(self) -> int: ...  # requests in flight through the router

    @property
    def tree(self) -> ApproxPrefixTree: ...


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    spread_threshold: int = 32
    match_tolerance: float = 0.05  # matches this close to the best one are ties

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {self.balance_abs_threshold}")
        if self.balance_rel_threshold < 1.0:
            raise ValueError(f"balance_rel_threshold must be >= 1, got {self.balance_rel_threshold}")
        if self.spread_threshold < 1:
            raise ValueError(f"spread_threshold must be >= 1, got {self.spread_threshold}")


@dataclass(frozen=True)
class Decision:
    index: int  # into the candidates
    reason: str  # "cache_hit", "cache_miss", "imbalanced", "spread", or the policy's name
    matched_chars: int = 0


class Policy:
    name = ""

    def select(self, key: str, workers: Sequence[Candidate]) -> Decision:
        """Choose among ``workers`` (non-empty, all available) for a request whose routing key is ``key``."""
        raise NotImplementedError


def _least_loaded(workers: Sequence[Candidate], among: Sequence[int]) -> int:
    return min(among, key=lambda i: (workers[i].load, i))


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def select(self, key: str, workers: Sequence[Candidate]) -> Decision:
        i = self._next % len(workers)
        self._next += 1
        return Decision(i, self.name)


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, seed: Optional[int] = None) -> None:
        self._rng = random.Random(seed)

    def select(self, key: str, workers: Sequence[Candidate]) -> Decision:
        return Decision(self._rng.randrange(len(workers)), self.name)


class PowerOfTwo(Policy):
    """Two workers at random; the less loaded of them."""

    name = "power_of_two"

    def __init__(self, seed: Optional[int] = None) -> None:
        self._rng = random.Random(seed)

    def select(self, key: str, workers: Sequence[Candidate]) -> Decision:
        if len(workers) == 1:
            return Decision(0, self.name)
        pair = self._rng.sample(range(len(workers)), 2)
        return Decision(_least_loaded(workers, pair), self.name)


class CacheAware(Policy):
    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig = CacheAwareConfig()) -> None:
        self.config = config

    def select(self, key: str, workers: Sequence[Candidate]) -> Decision:
        c = self.config
        idx = range(len(workers))
        loads = [w.load for w in workers]
        hi, lo = max(loads), min(loads)
        if hi - lo > c.balance_abs_threshold and hi > c.balance_rel_threshold * lo:
            decision = Decision(_least_loaded(workers, idx), "imbalanced")
        else:
            decision = self._by_cache(key, workers)
        workers[decision.index].tree.insert(key)
        return decision

    def _by_cache(self, key: str, workers: Sequence[Candidate]) -> Decision:
        c = self.config
        matches = [w.tree.match(key) for w in workers]
        best = max(matches)
        if key and best / len(key) > c.cache_threshold:
            ties = [i for i, m in enumerate(matches) if m >= best * (1.0 - c.match_tolerance)]
            i = _least_loaded(workers, ties)
            if workers[i].load >= c.spread_threshold:
                j = _least_loaded(workers, [k for k in range(len(workers)) if k != i] or [i])
                if j != i and 2 * workers[j].load <= workers[i].load:
                    return Decision(j, "spread", matches[j])
            return Decision(i, "cache_hit", matches[i])
        smallest = min(w.tree.size for w in workers)
        roomy = [i for i, w in enumerate(workers) if w.tree.size == smallest]
        i = _least_loaded(workers, roomy)
        return Decision(i, "cache_miss", matches[i])


def make_policy(name: str, cache_aware: CacheAwareConfig = CacheAwareConfig(), seed: Optional[int] = None) -> Policy:
    if name == "cache_aware":
        return CacheAware(cache_aware)
    if name == "round_robin":
        return RoundRobin()
    if name == "power_of_two":
        return PowerOfTwo(seed)
    if name == "random":
        return RandomPolicy(seed)
    raise ValueError(f"policy must be one of {list(POLICIES)}, got {name!r}")
