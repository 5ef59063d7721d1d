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
