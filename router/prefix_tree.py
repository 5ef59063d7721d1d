"""ApproxPrefixTree: a character-level radix tree of the requests the router sent to one worker.

The router cannot see a worker's token-level radix cache, so it keeps its own picture: every prompt it
routes to a worker is inserted into that worker's tree, and ``match`` says how many leading characters
of a new prompt the worker has probably cached. The picture drifts when the worker evicts; the worker
set (``workers.py``) trims the tree least recently used first whenever the worker reports holding fewer
tokens than the tree implies, and clears it when the worker's cache was flushed or restarted.

Edges hold strings; ``children`` is keyed by an edge's first character; a node's ``last_access`` is a
logical clock (deterministic), refreshed along the path on every match and insert.
"""

from __future__ import annotations

import heapq
from typing import Optional

from radixlm.runtime.prefix_match import common_prefix_len

class _Node:
    __slots__ = ("key", "parent", "children", "last_access")

    def __init__(self, key: str, parent: Optional["_Node"], clock: int):
        self.key = key
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.last_access = clock


class ApproxPrefixTree:
    def __init__(self) -> None:
        self._clock = 0
        self.root = _Node("", None, 0)
        self.size = 0  # characters held by all edges

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def match(self, text: str) -> int:
        """Characters of ``text``'s prefix present in the tree (a match may end inside an edge)."""
        now = self._tick()
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            n = common_prefix_len(text, child.key, pos)
            child.last_access = now
            pos += n
            if n < len(child.key):
                break
            node = child
        return pos

    def insert(self, text: str) -> int:
        """Add ``text``; returns how many of its characters were new."""
        now = self._tick()
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node, now)
                node.children[text[pos]] = leaf
                self.size += len(leaf.key)
                return len(leaf.key)
            n = common_prefix_len(text, child.key, pos)
            child.last_access = now
            if n < len(child.key):  # split the edge at the mismatch
                mid = _Node(child.key[:n], node, now)
                node.children[text[pos]] = mid
                child.key = child.key[n:]
                child.parent = mid
                mid.children[child.key[0]] = child
                child = mid
            node = child
            pos += n
        return 0

    def evict(self, num_chars: int) -> int:
        """Drop least recently used leaves until ``num_chars`` characters are gone (or the tree is empty);
        returns how many were dropped."""
        heap = [(n.last_access, id(n), n) for n in self._leaves()]
        heapq.heapify(heap)
        dropped = 0
        while heap and dropped < num_chars:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            dropped += len(leaf.key)
            if parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        self.size -= dropped
        return dropped

    def clear(self) -> None:
        self.root = _Node("", None, self._clock)
        self.size = 0

    def _leaves(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            else:
                out.append(n)
        return out
