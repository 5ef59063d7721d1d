"""KVManager: who owns which KV slot, and the moves between owners.

A slot is owned by exactly one of: the free list (``KVPool``), one running request (the slots of tokens
it computed beyond its locked radix prefix), or the radix tree. Requests enter through ``admit`` (lock
the cached prefix, take a table row), grow through ``alloc_for``, hand their computed tokens to the tree
with ``release`` (after every extend, and when they finish or are retracted), and shrink with
``truncate`` (rejected jump-forward tokens). ``check`` verifies that nothing was lost:
free + evictable + protected + held_by_running == total, and (with KV tiers) each tier's own balance.

With a ``HiRadixCache`` (``--enable-hierarchical-cache``) ``admit`` reports how much of the prefix the
tiers hold (host tier, then whole disk blocks); once admission has counted those tokens in its memory
budget, ``load_tiers`` loads them into the device pool: they join the tree (tree-owned, like any cached
prefix) and are locked with it, so no new owner appears.
"""

from __future__ import annotations

import torch

from radixlm.runtime.kv_tiers import HiRadixCache
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool
from radixlm.runtime.radix_cache import MatchResult, RadixCache
from radixlm.runtime.req import Req


class KVManager:
    def __init__(self, kv_pool: KVPool, req_to_token_pool: ReqToTokenPool, cache: RadixCache):
        self.kv_pool = kv_pool
        self.table = req_to_token_pool
        self.req_to_token = req_to_token_pool.req_to_token  # [rows, max_context] int64
        self.cache = cache
        self.tiers = cache if isinstance(cache, HiRadixCache) else None
        self.total = kv_pool.size

    # ------------------------------------------------------------------ capacity
    def available(self) -> int:
        """Slots obtainable now: free plus evictable."""
        return self.kv_pool.available() + self.cache.evictable_size()

    def match(self, req: Req) -> MatchResult:
        """The request's cached prefix: on the device (``indices``) and in the host tier (``host_len``)."""
        return self.cache.match_prefix(req.all_ids[: req.max_prefix_len], req.cache_namespace)

    def cached_prefix_len(self, req: Req) -> int:
        """Prefix tokens the request need not compute (device or host tier)."""
        return self.match(req).total_len

    def slots(self, req: Req, start: int, end: int) -> torch.Tensor:
        return self.req_to_token[req.req_pool_idx, start:end]

    # ------------------------------------------------------------------ ownership moves
    def admit(self, req: Req) -> int:
        """Take a table row and lock the request's longest device-resident prefix (requires a free row).

        Returns how many further prefix tokens the KV tiers could load instead of recomputing (host tier,
        then disk blocks): the caller counts them in its memory budget and calls ``load_tiers`` once the
        request fits, or ``unadmit`` when it does not. Nothing has been loaded or evicted yet.
        """
        assert self.table.available(), "admit() needs a free req_to_token row"
        key, ns = req.all_ids[: req.max_prefix_len], req.cache_namespace
        m = self.cache.match_prefix(key, ns)
        row = self.table.alloc()
        n = len(m.indices)
        if n:
            self.req_to_token[row, :n] = m.indices
        self.cache.inc_lock_ref(m.last_node)
        req.req_pool_idx, req.last_node, req.locked_len, req.kv_len = row, m.last_node, n, n
        return 0 if self.tiers is None else self.tiers.loadable(key, m, ns)

    def load_tiers(self, req: Req, max_load: int) -> int:
        """Load up to ``max_load`` tokens of an admitted request's prefix from the host tier, then from
        disk, into the device pool (evicting unlocked device nodes for room). The loaded tokens join
        the tree and the request's lock moves to the new deepest node. Returns how many were loaded."""
        if self.tiers is None or max_load <= 0:
            return 0
        key, ns = req.all_ids[: req.max_prefix_len], req.cache_namespace
        m = self.cache.match_prefix(key, ns)
        before = len(m.indices)
        assert before == req.locked_len == req.kv_len, "load_tiers() runs right after admit()"
        m = self.tiers.load_back(m, max_load)
        if m.host_len == 0:
            m = self.tiers.load_from_disk(key, m, max_load - (len(m.indices) - before), ns)
        loaded = len(m.indices) - before
        if loaded:
            n = len(m.indices)
            self.req_to_token[req.req_pool_idx, before:n] = m.indices[before:]
            self.cache.inc_lock_ref(m.last_node)  # the new path first, so the old one never unlocks
            self.cache.dec_lock_ref(req.last_node)
            req.last_node, req.locked_len, req.kv_len = m.last_node, n, n
        return loaded

    def unadmit(self, req: Req) -> None:
        """Undo ``admit`` for a request that allocated nothing yet."""
        self.cache.dec_lock_ref(req.last_node)
        self.table.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node, req.locked_len, req.kv_len = None, None, 0, 0

    def alloc_for(self, req: Req, n: int) -> bool:
        """Allocate slots for req's next n tokens (evicting LRU leaves if needed) and record them."""
        short = n - self.kv_pool.available()
        if short > 0:
            self.cache.evict(short)
        slots = self.kv_pool.alloc(n)
        if slots is None:
            return False
        self.req_to_token[req.req_pool_idx, req.kv_len : req.kv_len + n] = slots
        return True

    def release(self, req: Req, finished: bool) -> None:
        """Hand req's computed tokens to the radix tree (or free them without a tree).

        Unfinished: the row is re-pointed at the tree's slots and the new path locked, so later requests
        share the prompt (and chunks) at once. Finished: the lock and the row are given up.
        """
        row = req.req_pool_idx
        if row is None:
            return
        slots = self.req_to_token[row, : req.kv_len].clone()
        if self.cache.disable:
            if finished:
                self.kv_pool.free(slots)
        else:
            key = req.all_ids[: req.kv_len]
            n_dup = self.cache.insert(key, slots, req.cache_namespace)
            self.kv_pool.free(slots[req.locked_len : n_dup])  # ours, but the tree already had them
            self.cache.dec_lock_ref(req.last_node)
            if not finished:
                m = self.cache.match_prefix(key, req.cache_namespace)
                assert len(m.indices) == req.kv_len
                self.req_to_token[row, : req.kv_len] = m.indices
                self.cache.inc_lock_ref(m.last_node)
                req.last_node, req.locked_len = m.last_node, req.kv_len
        if finished:
            self.table.free(row)
            req.req_pool_idx, req.last_node = None, None
            req.kv_len = req.locked_len = 0

    def truncate(self, req: Req, idx: int) -> None:
        """Free the K/V req computed for tokens at absolute index >= idx (never tree-owned slots)."""
        if req.kv_len > idx:
            assert idx >= req.locked_len
            self.kv_pool.free(self.req_to_token[req.req_pool_idx, idx : req.kv_len].clone())
            req.kv_len = idx

    def flush(self) -> None:
        """Empty the tree; the pool starts again as a fresh one does, its free slots in order."""
        self.cache.reset(free_slots=True)
        self.kv_pool.defragment()

    # ------------------------------------------------------------------ invariant
    def check(self, running: list[Req]) -> None:
        """Assert free + evictable + protected + held == total; when idle also no locks and no rows."""
        free = self.kv_pool.available()
        evictable = self.cache.evictable_size()
        protected = self.cache.protected_size()
        held = sum(r.kv_len - r.locked_len for r in running)
        if free + evictable + protected + held != self.total:
            raise AssertionError(
                f"KV memory leak: free={free} evictable={evictable} protected={protected} "
                f"held_by_running={held} total={self.total}"
            )
        if not running and protected != 0:
            raise AssertionError(f"KV memory: {protected} tokens still locked while idle")
        if not running and self.table.available() != self.table.size:
            raise AssertionError("req_to_token rows leaked while idle")
        if self.tiers is not None:
            self.tiers.check()

    def stats(self) -> dict:
        free = self.kv_pool.available()
        evictable = self.cache.evictable_size()
        return {
            "max_total_tokens": self.total,
            "free_tokens": free,
            "evictable_tokens": evictable,
            "protected_tokens": self.cache.protected_size(),
            "token_usage": 1.0 - (free + evictable) / self.total,
            "radix_cache_enabled": not self.cache.disable,
            **(self.tiers.stats() if self.tiers is not None else {}),
        }

    def close(self) -> None:
        """Finish the tiers' background work (pending host copies, queued disk writes)."""
        if self.tiers is not None:
            self.tiers.close()
