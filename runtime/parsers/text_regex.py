"""Regexes over free text, for grammars that let a model write prose until it opens a structure.

outlines-core compiles Rust ``regex`` syntax without look-around, so "any text that does not contain the
marker M" is spelled out from M's matching automaton instead of ``(?!M)``.
"""

from __future__ import annotations

import re


def _cls(chars: str) -> str:
    """A negated character class excluding ``chars`` (escaped for a bracket class)."""
    return "[^" + "".join("\\" + c if c in "\\]^-[" else c for c in dict.fromkeys(chars)) + "]"


def text_without(marker: str, then: str | None = None, then_required: bool = False) -> str:
    """Regex for every string (newlines and any Unicode included) that does not contain ``marker``.

    Requires the marker's first character not to recur in it (``<tool_call>``, ``[TOOL_CALLS]``): then the
    automaton that tracks "how much of the marker was just read" falls back only to state 0 or 1, and the
    language has a linear-size regex. States: S0 (nothing matched), Si (the first i characters matched).

    ``then``: a regex that may follow the text (it starts with the marker), giving "prose, then optionally
    ``then``". The alternatives are ordered so that every accepting path has the lowest priority: outlines-core
    builds its automaton with leftmost-first semantics, which drops lower-priority paths once one accepts, so
    "prose may end here" must never outrank "a call starts here". ``then_required``: the text must be
    followed by ``then`` (a reasoning block that has to close before the answer).
    """
    if len(marker) < 2 or marker[0] in marker[1:]:
        raise ValueError(f"text_without: marker {marker!r} must have 2+ characters and a unique first one")
    c = [re.escape(ch) for ch in marker]
    k = len(marker)
    first = marker[0]
    # From S1, paths that climb to some S_i (i < k) and fall back to S1 on the first character.
    back_to_s1 = "|".join([c[0]] + ["".join(c[1 : i + 1]) + c[0] for i in range(1, k - 1)])
    # From S1, paths that climb to S_i and leave to S0 on a character that is neither marker[i] nor the first.
    leave = "|".join("".join(c[1:i]) + _cls(first + marker[i]) for i in range(1, k))
    # Ending inside a partial match is fine (the marker was not completed); longest first, empty last.
    partial = "|".join("".join(c[1:i]) for i in range(k - 1, 0, -1))
    loop = f"(?:{_cls(first)}|{c[0]}(?:{back_to_s1})*(?:{leave}))"
    tail = f"{c[0]}(?:{back_to_s1})*(?:{partial})"
    if not then:
        return f"{loop}*(?:{tail}|)"
    # Prose may end inside a partial marker ("[[" before "[TOOL_CALLS]"), so ``then`` may follow the tail too.
    if then_required:
        return f"{loop}*(?:{then}|{tail}{then})"
    return f"{loop}*(?:{then}|{tail}(?:{then}|)|)"


def held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker`` (it may still become it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
