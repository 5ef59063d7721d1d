"""The length of the common prefix of two token sequences (or strings): one definition for the radix
cache, the scheduler's in-batch prefix check and the router's approximate tree.

A Python loop over elements costs about 50 ns per token; these callers compare prompts of thousands of
tokens many times per step, so whole chunks are compared first as slices (a C-level compare), and only
the chunk that holds the first difference is walked element by element. Imports nothing heavy: the
router process uses it too.
"""

from __future__ import annotations

from typing import Sequence

_CHUNK = 64


def common_prefix_len(a: Sequence, b: Sequence, start: int = 0) -> int:
    """Length of the common prefix of ``a[start:]`` and ``b``."""
    n = min(len(a) - start, len(b))
    i = 0
    while i + _CHUNK <= n and a[start + i:start + i + _CHUNK] == b[i:i + _CHUNK]:
        i += _CHUNK
    while i < n and a[start + i] == b[i]:
        i += 1
    return i

