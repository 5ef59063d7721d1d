"""RadixCache against a naive reference (a set of cached prefixes), driven by hypothesis."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixlm.runtime.memory_pool import KVPool
from radixlm.runtime.radix_cache import RadixCache

TOTAL = 64


def _pool() -> KVPool:
    return KVPool(TOTAL, num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32, device="cpu")


def _check_invariant(pool: KVPool, cache: RadixCache, held: int = 0) -> None:
    assert pool.available() + cache.evictable_size() + cache.protected_size() + held == TOTAL
    assert cache.evictable_size() >= 0 and cache.protected_size() >= 0
    assert cache.total_size() == cache.evictable_size() + cache.protected_size()


def _longest_cached(ref: set[tuple[int, ...]], key: list[int]) -> int:
    return max((len(p) for p in ref if tuple(key[: len(p)]) == p), default=0)


def _insert(pool, cache, ref, key) -> None:
    m = cache.match_prefix(key)
    slots = pool.alloc(len(key) - len(m.indices))
    if slots is None:
        cache.evict(len(key))
        slots = pool.alloc(len(key) - len(m.indices))
        if slots is None:
            return
    value = torch.cat([m.indices, slots])
    n_dup = cache.insert(key, value)
    assert n_dup >= len(m.indices)
    pool.free(value[len(m.indices) : n_dup])
    for i in range(1, len(key) + 1):
        ref.add(tuple(key[:i]))


keys = st.lists(st.integers(0, 3), min_size=1, max_size=12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), keys),
        st.tuples(st.just("match"), keys),
        st.tuples(st.just("lock"), keys),
        st.tuples(st.just("unlock"), st.integers(0, 100)),
        st.tuples(st.just("evict"), st.integers(1, 20)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_radix_cache_matches_reference(ops):
    pool = _pool()
    cache = RadixCache(pool)
    ref: set[tuple[int, ...]] = set()
    locked = []  # (node, prefix tuple)
    for op, arg in ops:
        if op == "insert":
            _insert(pool, cache, ref, arg)
        elif op == "match":
            m = cache.match_prefix(arg)
            assert len(m.indices) == _longest_cached(ref, arg)
            # The slots of a matched prefix are exactly those of its parts: distinct and allocated.
            assert len(set(m.indices.tolist())) == len(m.indices)
        elif op == "lock":
            m = cache.match_prefix(arg)
            cache.inc_lock_ref(m.last_node)
            locked.append((m.last_node, tuple(arg[: len(m.indices)])))
        elif op == "unlock" and locked:
            node, _ = locked.pop(arg % len(locked))
            cache.dec_lock_ref(node)
        elif op == "evict":
            cache.evict(arg)
            # The reference forgets whatever the tree no longer holds (eviction is the tree's choice),
            # but every locked prefix must survive.
            ref = {p for p in ref if len(cache.match_prefix(list(p)).indices) == len(p)}
            for _, prefix in locked:
                assert len(cache.match_prefix(list(prefix)).indices) == len(prefix)
        _check_invariant(pool, cache)
        for node, _ in locked:
            n = node
            while n is not cache.root:
                assert n.lock_ref > 0
                n = n.parent
    for node, _ in locked:
        cache.dec_lock_ref(node)
    assert cache.protected_size() == 0
    cache.evict(TOTAL)
    assert pool.available() == TOTAL
    _check_invariant(pool, cache)


def test_split_on_partial_match_and_lru_eviction():
    pool = _pool()
    cache = RadixCache(pool)
    ref: set = set()
    _insert(pool, cache, ref, [1, 2, 3, 4])
    _insert(pool, cache, ref, [1, 2, 9])
    m = cache.match_prefix([1, 2, 7])
    assert len(m.indices) == 2 and m.last_node.key == [1, 2]  # split at the partial match
    cache.match_prefix([1, 2, 9])  # make [9] more recent than [3, 4]
    assert cache.evict(1) == 2  # the least recently used leaf [3, 4] goes first
    assert len(cache.match_prefix([1, 2, 9]).indices) == 3
    assert len(cache.match_prefix([1, 2, 3, 4]).indices) == 2
    _check_invariant(pool, cache)


def test_lock_protects_and_negative_lock_raises():
    pool = _pool()
    cache = RadixCache(pool)
    _insert(pool, cache, set(), [5, 6, 7])
    m = cache.match_prefix([5, 6, 7])
    cache.inc_lock_ref(m.last_node)
    assert cache.evict(100) == 0 and cache.protected_size() == 3
    cache.dec_lock_ref(m.last_node)
    import pytest

    with pytest.raises(AssertionError):
        cache.dec_lock_ref(m.last_node)


def test_disabled_cache_matches_nothing():
    pool = _pool()
    cache = RadixCache(pool, disable=True)
    assert cache.insert([1, 2], torch.tensor([1, 2])) == 0
    assert len(cache.match_prefix([1, 2]).indices) == 0
