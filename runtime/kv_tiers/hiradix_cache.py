"""HiRadixCache: the radix tree over a device pool, a host tier behind it and (optionally) a disk tier.

Where a node's K/V lives:
  * ``value`` set: on the device (evictable or protected, as in ``RadixCache``).
  * ``host_value`` set: a copy in the host tier (``HostTier``); with ``value`` None the node is *host
    only*: evicted from the device, its tokens still in the tree, loaded back on a later match.
  * Blocks of whole prefixes may also be on disk (``DiskTier``): not owned by the tree, read on a miss.

Rules that keep it simple and checkable (``check``):
  * Device residency is closed under ancestors: a host-only node has only host-only children. So a
    match is a device run followed by a host run, and device eviction takes nodes without device
    children.
  * Host-only nodes are never locked (locks protect device slots; ``load_back`` makes a node device
    resident before anyone locks it).
  * Every host slot in use belongs to exactly one node's ``host_value``: host free + host held == host
    total. Device slots keep the single-owner rule of the base class.

Write policies (SGLang's names and semantics): ``write_through`` backs a node up to the host tier when
it enters the tree, ``write_through_selective`` once inserts have hit it ``SELECTIVE_THRESHOLD`` times
(its creation counts as the first), ``write_back`` only when it is evicted from the device. Under the
write_through policies eviction never copies: a node evicted without a host copy (not hot enough, or
the host was full when it was due) is dropped with its host-only subtree, as the plain tree drops it;
under write_back a node evicted without host room is dropped the same way. The host tier has its own LRU:
it frees host-only leaves first, then host copies of nodes still on the device.
"""

from __future__ import annotations

import heapq

import torch

from radixlm.runtime.kv_tiers.disk_tier import DiskTier
from radixlm.runtime.kv_tiers.host_tier import HostTier
from radixlm.runtime.kv_tiers.pool_io import gather_kv, scatter_kv
from radixlm.runtime.memory_pool import KVPool
from radixlm.runtime.prefix_match import common_prefix_len
from radixlm.runtime.radix_cache import _EMPTY, MatchResult, RadixCache, TreeNode

WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
SELECTIVE_THRESHOLD = 2  # reuses before write_through_selective backs a node up (SGLang's default)


class HiRadixCache(RadixCache):
    def __init__(self, kv_pool: KVPool, host: HostTier, write_policy: str = "write_through", disk: DiskTier | None = None):
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"hicache_write_policy must be one of {list(WRITE_POLICIES)}, got {write_policy!r}")
        self.host = host
        self.disk = disk
        self.write_policy = write_policy
        self._loading: set[TreeNode] = set()  # host-only nodes a load is about to read: not host-evictable
        self.host_hit_tokens = 0  # tokens loaded back from the host tier instead of recomputed
        self.disk_hit_tokens = 0  # tokens read from disk instead of recomputed
        super().__init__(kv_pool)

    # ------------------------------------------------------------------ public API
    def reset(self, free_slots: bool = True) -> None:
        if free_slots and hasattr(self, "root"):
            self.host.synchronize()
            for node in self._all_nodes():
                if node.host_value is not None:
                    self.host.free(node.host_value)
        super().reset(free_slots)
        self._host_held = 0

    def match_prefix(self, key: list[int], namespace: str = "") -> MatchResult:
        start = self._ns_root(namespace, create=False)
        if not key or start is None:
            return MatchResult(_EMPTY, self.root)
        now = next(self._clock)
        node, pos, pieces = start, 0, []
        node.last_access_time = now
        device_node, host_len, last_host = start, 0, None
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = common_prefix_len(key, child.key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access_time = now
            if child.value is None:
                host_len += n
                last_host = child
            else:
                pieces.append(child.value)
                device_node = child
            node, pos = child, pos + n
        indices = torch.cat(pieces) if pieces else _EMPTY
        return MatchResult(indices, device_node, host_len, last_host)

    def insert(self, key: list[int], value: torch.Tensor, namespace: str = "") -> int:
        """As ``RadixCache.insert``; host-only nodes on the path adopt the caller's slots (revived).

        Returns the device-resident prefix length: only ``value`` up to it duplicates tree slots.
        """
        node, pos, now = self._ns_root(namespace, create=bool(key)), 0, next(self._clock)
        on_device = 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                new = TreeNode(key=list(key[pos:]), value=value[pos:].clone(), parent=node, last_access_time=now)
                node.children[key[pos]] = new
                self._evictable += len(new.key)
                self._note_hit(new)
                break
            n = common_prefix_len(key, child.key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access_time = now
            if child.value is None:  # evicted from the device; the caller computed it again
                child.value = value[pos : pos + n].clone()
                self._evictable += n
            else:
                on_device = pos + n
                self._note_hit(child)
            node, pos = child, pos + n
        if self.disk is not None:
            self._persist(key, value, namespace)
        return on_device

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` device slots, LRU first, keeping the nodes in the host tier."""
        if num_tokens <= 0:
            return 0
        self.host.poll()
        heap = [n for n in self._all_nodes() if self._device_evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            node = heapq.heappop(heap)
            if not self._device_evictable(node):
                continue
            size = len(node.key)
            parent = node.parent
            if node.host_value is not None or (self.write_policy == "write_back" and self._backup(node)):
                self.kv_pool.free(node.value)
                node.value = None
            else:  # no host copy (write_through*: not hot enough or no host room; write_back: no room)
                self._drop_subtree(node)  # dropped as the plain tree would (with its host-only subtree)
            self._evictable -= size
            freed += size
            if self._device_evictable(parent):
                heapq.heappush(heap, parent)
        return freed

    def loadable(self, key: list[int], m: MatchResult, namespace: str = "") -> int:
        """Tokens after the device match ``m`` of ``key`` that ``load_back`` then ``load_from_disk`` would
        bring in (given the room): the host run, then the disk blocks that follow it."""
        n = m.host_len
        if self.disk is not None:
            n += self.disk.probe(key, m.total_len, len(key), namespace)
        return n

    def load_back(self, m: MatchResult, max_tokens: int) -> MatchResult:
        """Load (up to ``max_tokens`` of) the host-tier part of match ``m`` into the device pool.

        The device prefix of ``m`` stays locked while device slots are freed for the load. Returns the
        match extended by what was loaded (the whole host run, unless memory or ``max_tokens`` cut it;
        ``host_len`` then counts what was left behind, and ``last_host_node`` is not reported).
        """
        if m.host_len == 0 or max_tokens <= 0:
            return m
        nodes = []
        n = m.last_host_node
        while n is not m.last_node:
            nodes.append(n)
            n = n.parent
        nodes.reverse()
        self.inc_lock_ref(m.last_node)  # our device prefix must not be evicted to make room
        try:
            room = min(max_tokens, self.kv_pool.available() + self.evictable_size())
            take, total = [], 0
            for node in nodes:
                if total + len(node.key) > room:
                    if room - total > 0:
                        take.append(self._split(node, room - total))
                        total = room
                    break
                take.append(node)
                total += len(node.key)
            if not take:
                return m
            self._loading = set(take)
            short = total - self.kv_pool.available()
            if short > 0:
                self.evict(short)
            slots = self.kv_pool.alloc(total)
            if slots is None:  # pragma: no cover - room was computed from free + evictable
                return m
            self.host.load(torch.cat([node.host_value for node in take]), slots)
            off = 0
            for node in take:
                node.value = slots[off : off + len(node.key)].clone()
                off += len(node.key)
            self._evictable += total
            self.host_hit_tokens += total
        finally:
            self._loading = set()
            self.dec_lock_ref(m.last_node)
        return MatchResult(torch.cat([m.indices, slots]), take[-1], m.host_len - total, None)

    def load_from_disk(self, key: list[int], m: MatchResult, max_tokens: int, namespace: str = "") -> MatchResult:
        """Extend match ``m`` of ``key`` in ``namespace`` (with no host part left) by K/V blocks read from
        disk (stored under the same namespace), into the tree.

        Reads consecutive blocks after the device match until the first miss (a torn or foreign block
        is a miss); loads at most ``max_tokens`` tokens and only what the device pool can hold.
        """
        if self.disk is None or m.host_len or max_tokens <= 0:
            return m
        start = int(m.indices.numel())
        end = min(len(key), start + max_tokens)
        rows = self.disk.read_run(key, start, end, namespace)  # [L, 2, T, Hkv, D] covering key[start:start+T]
        if rows is None:
            return m
        n = rows.shape[2]
        self.inc_lock_ref(m.last_node)
        try:
            n = min(n, self.kv_pool.available() + self.evictable_size())
            if n <= 0:
                return m
            short = n - self.kv_pool.available()
            if short > 0:
                self.evict(short)
            slots = self.kv_pool.alloc(n)
        finally:
            self.dec_lock_ref(m.last_node)
        if slots is None:  # pragma: no cover - n was bounded by free + evictable
            return m
        scatter_kv(self.kv_pool, slots, rows[:, :, :n])
        full = torch.cat([m.indices, slots])
        on_device = self.insert(key[: start + n], full, namespace)
        assert on_device == start, "disk load raced with the tree"
        self.disk_hit_tokens += n
        return self.match_prefix(key[: start + n], namespace)

    # ------------------------------------------------------------------ sizes and checks
    def total_size(self) -> int:
        return sum(len(n.key) for n in self._all_nodes() if n is not self.root and n.value is not None)

    def host_held(self) -> int:
        return self._host_held

    def check(self) -> None:
        """Every tier's invariant (raises AssertionError): see the module docstring."""
        self.host.poll()
        on_device = host = 0
        host_slots = []
        for node in self._all_nodes():
            if node is self.root:
                continue
            if node.value is not None:
                on_device += len(node.key)
            else:
                if node.host_value is None:
                    raise AssertionError("HiRadixCache: a node is in no tier")
                if node.lock_ref:
                    raise AssertionError("HiRadixCache: a host-only node is locked")
                if any(c.value is not None for c in node.children.values()):
                    raise AssertionError("HiRadixCache: a device node under a host-only node")
            if node.host_value is not None:
                host += len(node.key)
                host_slots.append(node.host_value)
        if on_device != self._evictable + self._protected:
            raise AssertionError(
                f"HiRadixCache: device nodes hold {on_device} tokens, evictable + protected = "
                f"{self._evictable + self._protected}"
            )
        if host != self._host_held or self.host.available() + host != self.host.size:
            raise AssertionError(
                f"host tier leak: free={self.host.available()} held_by_tree={host} (counted {self._host_held}) "
                f"total={self.host.size}"
            )
        if host_slots:
            s = torch.cat(host_slots)
            if s.unique().numel() != s.numel() or int(s.min()) < 1:
                raise AssertionError("host tier: a slot has two owners (or is the padding slot)")
        if self.disk is not None:
            self.disk.check()

    def stats(self) -> dict:
        out = {
            "hicache_host_tokens": self._host_held,
            "hicache_host_capacity_tokens": self.host.size,
            "hicache_host_bytes": self.host.nbytes(),
            "hicache_compression": self.host.codec.name,
            "hicache_write_policy": self.write_policy,
            "hicache_host_hit_tokens": self.host_hit_tokens,
            "hicache_disk_hit_tokens": self.disk_hit_tokens,
        }
        if self.disk is not None:
            out.update(self.disk.stats())
        return out

    def close(self) -> None:
        self.host.synchronize()
        if self.disk is not None:
            self.disk.close()

    # ------------------------------------------------------------------ internals
    def _device_evictable(self, node: TreeNode) -> bool:
        return (
            node is not self.root
            and node.value is not None
            and node.lock_ref == 0
            and all(c.value is None for c in node.children.values())
        )

    def _note_hit(self, node: TreeNode) -> None:
        """An insert created or reused ``node``: the write_through policies back it up once it has been
        hit ``1`` (write_through) or ``SELECTIVE_THRESHOLD`` (write_through_selective) times."""
        if self.write_policy == "write_back" or node.host_value is not None:
            return
        node.hit_count += 1
        if node.hit_count >= (1 if self.write_policy == "write_through" else SELECTIVE_THRESHOLD):
            self._backup(node)

    def _backup(self, node: TreeNode) -> bool:
        """Give a device node a host copy (evicting host LRU if needed); False if the host has no room."""
        if node.host_value is not None:
            return True
        n = len(node.key)
        if self.host.available() < n:
            self._evict_host(n - self.host.available(), keep=node)
        slots = self.host.alloc(n)
        if slots is None:
            return False
        self.host.backup(node.value, slots)
        node.host_value = slots
        self._host_held += n
        return True

    def _evict_host(self, num_tokens: int, keep: TreeNode) -> None:
        """Free host slots, LRU first: host-only leaves, then host copies of device nodes."""
        def leaf(n: TreeNode) -> bool:
            return n is not self.root and n.value is None and not n.children and n not in self._loading

        heap = [n for n in self._all_nodes() if leaf(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            node = heapq.heappop(heap)
            parent = node.parent
            freed += self._free_host(node)
            self._remove_child(parent, node)
            if leaf(parent):
                heapq.heappush(heap, parent)
        if freed >= num_tokens:
            return
        copies = [n for n in self._all_nodes() if n.value is not None and n.host_value is not None and n is not keep]
        for node in sorted(copies, key=lambda n: n.last_access_time):
            freed += self._free_host(node)
            if freed >= num_tokens:
                return

    def _free_host(self, node: TreeNode) -> int:
        n = len(node.key)
        self.host.free(node.host_value)
        node.host_value = None
        self._host_held -= n
        return n

    def _drop_subtree(self, node: TreeNode) -> None:
        """Remove a device node without device children, and its host-only descendants, from the tree."""
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n.host_value is not None:
                self._free_host(n)
        self.kv_pool.free(node.value)
        node.value = None
        self._remove_child(node.parent, node)

    def _persist(self, key: list[int], value: torch.Tensor, namespace: str) -> None:
        """Queue the whole blocks of ``key`` that the disk tier lacks (written in the background)."""
        for start, end, block_key in self.disk.missing_blocks(key, namespace):
            self.disk.write_async(block_key, key[start:end], gather_kv(self.kv_pool, value[start:end]).cpu())
