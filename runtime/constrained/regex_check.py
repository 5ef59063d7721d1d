"""The front end's cheap regex check: syntax, unsupported constructs and an expansion-size bound.

It parses with Python's regex parser (microseconds, no automaton) and walks the tree: look-around,
back-references and word boundaries are refused (outlines-core builds a DFA and has none of them), and
the pattern's *expanded size* (each literal or class counts 1; a bounded repetition multiplies its
body's size by its maximum; an unbounded one counts its body once) must stay under
``MAX_EXPANDED_POSITIONS``. That bound catches the memory blow-ups (``a{100000}{100000}``: 10^10) before
any process is asked to build them. What it cannot see (a DFA exponential in a small pattern, such as
``(a|b)*a(a|b){18}``) is bounded by the compile worker's time and memory limits
(``compile_worker.py``).
"""

from __future__ import annotations

import re

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _p
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

# Measured (docs/reliability.md): ~3,000 positions compile in 0.2 s, ~30,000 take ~20 s over a byte
# vocabulary; the compile worker's time limit refuses what this bound lets through but cannot afford.
MAX_EXPANDED_POSITIONS = 100_000

# Rust regex classes Python does not parse (\p{L}, \P{Greek}): a stand-in class for the check.
_UNICODE_CLASS = re.compile(r"\\[pP](\{[^}]*\}|[A-Za-z])")

_UNSUPPORTED = {
    _c.ASSERT: "look-ahead/look-behind",
    _c.ASSERT_NOT: "negative look-around",
    _c.GROUPREF: "back-references",
    _c.GROUPREF_EXISTS: "conditional groups",
}


def check_regex_cheap(pattern: str, field: str = "regex") -> None:
    """ValueError naming ``field`` for a pattern that cannot be compiled or is far too large to."""
    try:
        tree = _p.parse(_UNICODE_CLASS.sub("x", pattern))
    except (re.error, OverflowError, RecursionError) as e:
        raise ValueError(f"{field}: invalid regular expression {pattern[:200]!r}: {e}") from None
    try:
        size = _size(tree.data if hasattr(tree, "data") else list(tree), field)
    except RecursionError:
        raise ValueError(f"{field}: the regular expression is nested too deeply") from None
    if size > MAX_EXPANDED_POSITIONS:
        raise ValueError(
            f"{field}: the regular expression expands to about {size:.3g} positions, over the limit of "
            f"{MAX_EXPANDED_POSITIONS:,} (nested or large repetition counts); its automaton would not fit"
        )


def _size(items: list, field: str) -> int:
    total = 0
    for op, av in items:
        if op in _UNSUPPORTED:
            raise ValueError(f"{field}: {_UNSUPPORTED[op]} are not supported (the grammar compiles to a DFA)")
        if op is _c.AT and av in (_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY):
            raise ValueError(f"{field}: word boundaries (\\b, \\B) are not supported")
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            body = _size(list(sub), field)
            total += body * max(lo if hi is _c.MAXREPEAT else hi, 1)
        elif op is _c.SUBPATTERN:
            total += _size(list(av[-1]), field)
        elif op is getattr(_c, "ATOMIC_GROUP", None):
            total += _size(list(av), field)
        elif op is _c.BRANCH:
            total += sum(_size(list(alt), field) for alt in av[1])
        else:
            total += 1
        if total > MAX_EXPANDED_POSITIONS * 1000:  # already hopeless; stop multiplying
            return total
    return total
