"""Which cases of a parametrized family run in the fast tier (`pytest -m "not slow"`).

The full suite runs every case. The fast tier, the inner loop, keeps the cases named here: each family
keeps cheap cases that still cover its distinct features, and the rest carry the `slow` mark.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest


def fast_subset(values: Iterable, fast: Iterable) -> list:
    """`values` for `pytest.mark.parametrize`, every one not in `fast` marked slow; ids are unchanged."""
    values, fast = list(values), list(fast)
    unknown = [f for f in fast if f not in values]
    if unknown:
        raise ValueError(f"fast cases not among the values: {unknown}")
    out = []
    for v in values:
        if v in fast:
            out.append(v)
        else:
            out.append(pytest.param(*v, marks=pytest.mark.slow) if isinstance(v, tuple)
                       else pytest.param(v, marks=pytest.mark.slow))
    return out
