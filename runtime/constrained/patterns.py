"""Regex normalisation shared by the regex and JSON-schema paths.

outlines-core compiles with Rust ``regex`` syntax, where ``\\d``, ``\\w`` and ``\\s`` are Unicode classes:
``\\d`` also matches Arabic-Indic or Devanagari digits, so an "IPv4" regex lets a model write ``۱۲.۳.۴.۵``.
Users (and JSON Schema, whose ``pattern`` is ECMA-262) mean ASCII, as JavaScript and xgrammar do, so we
rewrite those three shorthands to explicit ASCII classes. ``\\D``, ``\\W``, ``\\S`` keep their meaning.
"""

from __future__ import annotations

_OUTSIDE = {"d": "[0-9]", "w": "[0-9A-Za-z_]", "s": r"[\t\n\v\f\r ]"}
_INSIDE = {"d": "0-9", "w": "0-9A-Za-z_", "s": r"\t\n\v\f\r "}


def ascii_shorthands(pattern: str) -> str:
    """Rewrite ``\\d``/``\\w``/``\\s`` to ASCII classes, inside or outside brackets; escapes untouched."""
    out: list[str] = []
    depth = 0  # bracket-class nesting (Rust allows nested classes like [a-z&&[^aeiou]])
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            table = _INSIDE if depth else _OUTSIDE
            out.append(table.get(nxt, c + nxt))
            i += 2
            continue
        if c == "[":
            out.append(c)
            depth += 1
            i += 1
            # A ']' right after '[' or '[^' is a literal, not the end of the class.
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":
                out.append("]")
                i += 1
            continue
        if c == "]" and depth:
            depth -= 1
        out.append(c)
        i += 1
    return "".join(out)


def _top_level_alternatives(pattern: str) -> list[str]:
    """``pattern`` split at its top-level ``|`` (outside groups, classes and escapes)."""
    parts, start, depth, in_class, i = [], 0, 0, False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            if pattern[i + 1:i + 2] == "^":
                i += 1
            if pattern[i + 1:i + 2] == "]":  # a ']' first in a class is a literal
                i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return parts


def strip_end_anchors(pattern: str) -> str:
    """Drop ``^`` at the start and ``$`` at the end of each top-level alternative.

    A constrained output must match the whole pattern anyway, so SGLang (whose engines anchor every
    grammar) gives these anchors no meaning; outlines-core refuses them. Anchors anywhere else are
    left alone (and refused by the compiler), since they would mean something else.
    """
    out = []
    for alt in _top_level_alternatives(pattern):
        if alt.startswith("^"):
            alt = alt[1:]
        if alt.endswith("$"):
            backslashes = len(alt) - 1 - len(alt[:-1].rstrip("\\"))
            if backslashes % 2 == 0:  # an unescaped '$'
                alt = alt[:-1]
        out.append(alt)
    return "|".join(out)
