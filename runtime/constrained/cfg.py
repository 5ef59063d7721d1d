"""Context-free grammars (``ebnf``, ``structural_tag``): checked and compiled by xgrammar.

Until the xgrammar backend is wired into the scheduler, a request carrying one is rejected by name
(never run unconstrained).
"""

from __future__ import annotations


def validate_cfg(kind: str, pattern: str) -> None:
    """ValueError naming the field: this server cannot constrain by a context-free grammar yet."""
    raise ValueError(f"{kind}: context-free grammars are not supported by this server; use regex or json_schema")
