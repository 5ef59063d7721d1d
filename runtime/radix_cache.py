"""RadixCache: a radix tree from token-id prefixes to KV-pool slots (RadixAttention).

Each edge holds a run of token ids (``key``) and the KV slots that hold their K/V (``value``). A
request's prompt walks the tree; the matched slots are reused instead of recomputed.

Contract:
  * ``match_prefix(key)`` returns the slots of the longest cached prefix and the node it ends in,
    splitting a node when the match ends inside its edge, so the returned node covers exactly the
    match. It refreshes the path's ``last_access_time``.
  * ``insert(key, value)`` adds a prefix and returns how many leading tokens were already cached;
    the caller still owns ``value[:that]`` and must free those duplicate slots (single owner rule).
  * ``inc_lock_ref(node)`` / ``dec_lock_ref(node)`` protect a path from eviction while a request uses
    it, moving sizes between ``evictable_size`` and ``protected_size``.
  * ``evict(n)`` frees at least ``n`` tokens (if possible) from unlocked leaves, least recent first.
  * Invariant (checked by the scheduler): kv_pool free + evictable + protected == total slots, when no
    request is running. Every slot in the tree is owned by the tree and freed only by ``evict``/``reset``.

Namespaces (SGLang's ``extra_key``, OpenAI's ``cache_salt``): ``match_prefix``/``insert`` take a
``namespace``; "" is the shared tree under ``root``. Every other namespace has its own root node: a child
of ``root`` with an empty key (so it holds no slots), keyed ``("ns", name)`` instead of by a token, and
permanently locked (``lock_ref`` 1) so eviction never takes it; it is removed when its last child goes.
A prefix is only ever matched inside its own namespace, so two namespaces never share a node (or a slot).

``HiRadixCache`` (``radixlm.runtime.kv_tiers``) extends this tree with tiers behind the device pool:
there a node may keep its tokens with ``value`` None (evicted from the device) and its K/V in the host
tier (``host_value``); ``MatchResult.host_len`` then counts the matched tokens that can be loaded back.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from radixlm.runtime.memory_pool import KVPool
from radixlm.runtime.prefix_match import common_prefix_len

_EMPTY = torch.empty(0, dtype=torch.int64)


@dataclass(eq=False)
class TreeNode:
    key: list[int] = field(default_factory=list)
    value: torch.Tensor | None = field(default_factory=lambda: _EMPTY)  # [len(key)] int64 KV slots; None: not on device
    parent: "TreeNode | None" = None
    # first token of child key → child; the root also maps ("ns", name) → that namespace's root
    children: dict[int | tuple[str, str], "TreeNode"] = field(default_factory=dict)
    lock_ref: int = 0
    last_access_time: int = 0
    host_value: torch.Tensor | None = None  # [len(key)] int64 host-tier slots (HiRadixCache only)
    hit_count: int = 0  # inserts that created or reused this node (HiRadixCache's write_through policies)
    namespace: str | None = None  # set only on a namespace's own root (see RadixCache, "Namespaces")

    def __lt__(self, other: "TreeNode") -> bool:  # for the LRU heap
        return self.last_access_time < other.last_access_time


class MatchResult(NamedTuple):
    indices: torch.Tensor  # [matched_len] int64 KV slots
    last_node: TreeNode  # the deepest matched node on the device
    host_len: int = 0  # further matched tokens whose K/V is in the host tier only (HiRadixCache)
    last_host_node: TreeNode | None = None  # the deepest of those nodes

    @property
    def total_len(self) -> int:
        """Matched tokens in any tier: what a request would not have to recompute."""
        return int(self.indices.numel()) + self.host_len


class RadixCache:
    def __init__(self, kv_pool: KVPool, disable: bool = False):
        self.kv_pool = kv_pool
        self.disable = disable
        self._clock = itertools.count(1)  # logical time: deterministic, strictly increasing
        self.reset(free_slots=False)

    # ------------------------------------------------------------------ public API
    def reset(self, free_slots: bool = True) -> None:
        """Drop every node; with ``free_slots`` their KV slots go back to the pool."""
        if free_slots and hasattr(self, "root"):
            for node in self._all_nodes():
                if node is not self.root and node.value is not None:
                    self.kv_pool.free(node.value)
        self.root = TreeNode(lock_ref=1)  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    def match_prefix(self, key: list[int], namespace: str = "") -> MatchResult:
        if self.disable or not key:
            return MatchResult(_EMPTY, self.root)
        node, pieces = self._ns_root(namespace, create=False), []
        if node is None:  # nothing cached in this namespace
            return MatchResult(_EMPTY, self.root)
        now = next(self._clock)
        node.last_access_time = now
        pos = 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = common_prefix_len(key, child.key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access_time = now
            pieces.append(child.value)
            node, pos = child, pos + n
            if n == 0:  # pragma: no cover - common_prefix_len >= 1 since first tokens agree
                break
        indices = torch.cat(pieces) if pieces else _EMPTY
        return MatchResult(indices, node)

    def insert(self, key: list[int], value: torch.Tensor, namespace: str = "") -> int:
        """Insert ``key → value``; returns the length of the prefix that was already cached."""
        if self.disable:
            return 0
        node, pos, now = self._ns_root(namespace, create=bool(key)), 0, next(self._clock)
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                new = TreeNode(key=list(key[pos:]), value=value[pos:].clone(), parent=node, last_access_time=now)
                node.children[key[pos]] = new
                self._evictable += len(new.key)
                return pos
            n = common_prefix_len(key, child.key, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access_time = now
            node, pos = child, pos + n
        return pos

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref <= 0:
                raise AssertionError("RadixCache: lock_ref would go negative")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots from unlocked leaves, LRU first. Returns how many were freed."""
        if self.disable or num_tokens <= 0:
            return 0
        heap = [n for n in self._all_nodes() if not n.children and n.lock_ref == 0 and n is not self.root]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_tokens:
            leaf = heapq.heappop(heap)
            self.kv_pool.free(leaf.value)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            self._remove_child(parent, leaf)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return freed

    # ------------------------------------------------------------------ sizes
    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return sum(len(n.key) for n in self._all_nodes())

    def namespaces(self) -> list[str]:
        """The namespaces that hold nodes ("" first when it does)."""
        out = [""] if any(c.namespace is None for c in self.root.children.values()) else []
        return out + sorted(c.namespace for c in self.root.children.values() if c.namespace is not None)

    # ------------------------------------------------------------------ internals
    def _ns_root(self, namespace: str, create: bool) -> TreeNode | None:
        """The node a namespace's prefixes hang from (``root`` for ""); made by the first insert, None
        before that unless ``create``."""
        if not namespace:
            return self.root
        node = self.root.children.get(("ns", namespace))
        if node is None and create:
            node = TreeNode(key=[], value=_EMPTY, parent=self.root, lock_ref=1, namespace=namespace)
            self.root.children[("ns", namespace)] = node
        return node

    def _remove_child(self, parent: TreeNode, child: TreeNode) -> None:
        """Unlink ``child``; a namespace root left empty and unused goes with it."""
        del parent.children[child.key[0]]
        if parent.namespace is not None and not parent.children and parent.lock_ref == 1:
            del self.root.children[("ns", parent.namespace)]

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split ``child`` after its first n tokens; returns the new upper node (covering key[:n])."""
        upper = TreeNode(
            key=child.key[:n],
            value=None if child.value is None else child.value[:n],
            parent=child.parent,
            lock_ref=child.lock_ref,
            last_access_time=child.last_access_time,
            host_value=None if child.host_value is None else child.host_value[:n],
            hit_count=child.hit_count,
        )
        upper.children = {child.key[n]: child}
        child.parent.children[child.key[0]] = upper
        child.parent = upper
        child.key = child.key[n:]
        if child.value is not None:
            child.value = child.value[n:]
        if child.host_value is not None:
            child.host_value = child.host_value[n:]
        return upper

    def _all_nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
