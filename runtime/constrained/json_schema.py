"""JSON schema → regex, through outlines-core, with the gaps that would break validity filled or refused.

outlines-core's ``build_regex_from_schema`` does most of the work. Measured against ``jsonschema`` it has
three kinds of gap, handled here by rewriting the schema before conversion:

* **ignored bounds**: ``minimum`` / ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum`` on integers and
  numbers are dropped by outlines-core, so "age between 0 and 120" could emit ``-7``. We replace each bounded
  numeric sub-schema by a placeholder ``const`` and substitute our own digit-range regex afterwards (bounded
  numbers are written without exponent; non-integral bounds are honoured conservatively, never exceeded).
* **slow generic containers**: ``{"type": "object"}`` / ``{"type": "array"}`` without properties / items
  expand to a ~7 kB regex whose automaton takes 3-8 s to build (measured with 256- and 6144-token
  vocabularies). We substitute a generic JSON object / array nested two containers deep (outlines-core
  nests three), which compiles in about 0.2 s. ``response_format: json_object`` uses it
  (:data:`JSON_OBJECT_SCHEMA`).
* **keywords it silently ignores** (``multipleOf``, ``uniqueItems``, ``not``, ``if``/``then``/``else``,
  ``patternProperties``, ``allOf`` with several members, a ``pattern`` next to ``minLength``/``maxLength``,
  ``required`` names with no property, ``min/maxProperties`` next to ``properties``): outputs could fail
  validation, so these raise ``ValueError``.

Known limit: a string ``pattern`` is inserted into the JSON regex as is, so a pattern that can produce ``"``,
``\\`` or control characters (``.*``) can end the JSON string early; use character classes that exclude them.
"""

from __future__ import annotations

import copy
import json
import math
import secrets
from typing import Any

from outlines_core.json_schema import NUMBER, STRING, WHITESPACE, build_regex_from_schema

from radixlm.runtime.constrained.patterns import ascii_shorthands

JSON_OBJECT_SCHEMA = '{"type": "object"}'  # response_format json_object: any JSON object

_UNSUPPORTED = ("multipleOf", "not", "if", "then", "else", "patternProperties", "dependentRequired",
                "dependentSchemas", "dependencies", "contains", "propertyNames", "unevaluatedProperties",
                "unevaluatedItems")
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_MAX_BOUND = 10**40  # beyond this a bound is treated as absent (the digit-range regex would only grow)


# --------------------------------------------------------------------------- digit ranges
def _same_length_range(lo: str, hi: str) -> str:
    """Regex for digit strings of len(lo) == len(hi) between lo and hi inclusive (leading zeros allowed)."""
    if lo == hi:
        return lo
    if len(lo) == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return f"{lo[0]}(?:{_same_length_range(lo[1:], hi[1:])})"
    n = len(lo) - 1
    lo_full, hi_full = lo[1:] == "0" * n, hi[1:] == "9" * n
    parts = []
    start = int(lo[0]) if lo_full else int(lo[0]) + 1
    end = int(hi[0]) if hi_full else int(hi[0]) - 1
    if not lo_full:
        parts.append(f"{lo[0]}(?:{_same_length_range(lo[1:], '9' * n)})")
    if start <= end:
        parts.append(f"[{start}-{end}][0-9]{{{n}}}")
    if not hi_full:
        parts.append(f"{hi[0]}(?:{_same_length_range('0' * n, hi[1:])})")
    return "|".join(parts)


def nonneg_range_regex(lo: int, hi: int | None) -> str | None:
    """Regex for the decimal form (no leading zeros) of integers in [lo, hi] (hi None: unbounded), lo >= 0.
    None when the range is empty."""
    if lo < 0:
        raise ValueError("lo must be >= 0")
    if hi is not None and lo > hi:
        return None
    d_lo = len(str(lo))
    d_hi = len(str(hi)) if hi is not None else d_lo
    parts = []
    for d in range(d_lo, d_hi + 1):
        a = lo if d == d_lo else 10 ** (d - 1)
        b = hi if (hi is not None and d == d_hi) else 10**d - 1
        parts.append(_same_length_range(str(a), str(b)))
    if hi is None:
        parts.append(f"[1-9][0-9]{{{d_lo},}}")
    return "|".join(parts)


def integer_range_regex(lo: int | None, hi: int | None) -> str | None:
    """Regex for JSON integers in [lo, hi] (None: unbounded on that side); None when empty."""
    alts = []
    if hi is None or hi >= 0:
        r = nonneg_range_regex(max(lo, 0) if lo is not None else 0, hi)
        if r:
            alts.append(r)
    if lo is None or lo <= -1:  # negatives: magnitudes in [max(-hi, 1), -lo]
        r = nonneg_range_regex(max(-hi, 1) if hi is not None else 1, -lo if lo is not None else None)
        if r:
            alts.append(f"-(?:{r})")
    return "|".join(f"(?:{a})" for a in alts) or None


def _bounds(node: dict) -> tuple[float | None, bool, float | None, bool]:
    """(low, low_exclusive, high, high_exclusive) from draft-4 (boolean) or draft-6+ (numeric) keywords."""
    for key in _BOUND_KEYS:
        v = node.get(key)
        if v is not None and not isinstance(v, bool) and not isinstance(v, (int, float)):
            raise ValueError(f"json_schema: {key} must be a number, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"json_schema: {key} must be finite, got {v!r}")

    def side(inclusive_key: str, exclusive_key: str, tighter) -> tuple[float | None, bool]:
        bound, exclusive = node.get(inclusive_key), False
        ex = node.get(exclusive_key)
        if isinstance(ex, bool):
            exclusive = ex and bound is not None
        elif ex is not None and (bound is None or tighter(ex, bound)):
            bound, exclusive = ex, True
        if bound is not None and abs(bound) > _MAX_BOUND:
            return None, False
        return bound, exclusive

    lo, lo_ex = side("minimum", "exclusiveMinimum", lambda a, b: a >= b)
    hi, hi_ex = side("maximum", "exclusiveMaximum", lambda a, b: a <= b)
    return lo, lo_ex, hi, hi_ex


def bounded_number_regex(node: dict, integer: bool) -> str:
    """Regex for an integer / number sub-schema with bounds. Numbers: integer values, plus fractions where
    the whole interval [m, m+1) (or (-(m+1), -m]) is inside the bounds, so no output can violate them."""
    lo, lo_ex, hi, hi_ex = _bounds(node)
    int_lo = None if lo is None else (math.floor(lo) + 1 if lo_ex else math.ceil(lo))
    int_hi = None if hi is None else (math.ceil(hi) - 1 if hi_ex else math.floor(hi))
    alts = []
    ints = integer_range_regex(int_lo, int_hi)
    if ints:
        alts.append(ints)
    if not integer:
        frac = r"(?:\.[0-9]+)?"
        # "m.f" lies in [m, m+1): needs m >= int_lo and m + 1 <= hi.
        pos_hi = None if hi is None else math.floor(hi) - 1
        pos_lo = max(int_lo, 0) if int_lo is not None else 0
        pos = nonneg_range_regex(pos_lo, pos_hi) if pos_hi is None or pos_hi >= 0 else None
        if pos:
            alts.append(f"(?:{pos}){frac}")
        # "-m.f" lies in (-(m+1), -m]: needs -m <= hi (strictly when exclusive) and -(m+1) >= lo.
        if lo is None or lo <= -1:
            neg_lo = 0 if hi is None else max(0, (math.floor(-hi) + 1) if hi_ex else math.ceil(-hi))
            neg_hi = None if lo is None else math.floor(-lo) - 1
            neg = nonneg_range_regex(neg_lo, neg_hi) if neg_hi is None or neg_hi >= neg_lo else None
            if neg:
                alts.append(f"-(?:{neg}){frac}")
    if not alts:
        kind = "integer" if integer else "number"
        raise ValueError(f"json_schema: no {kind} satisfies the bounds in {json.dumps(node)}")
    return "|".join(alts)


# --------------------------------------------------------------------------- generic containers
def generic_container_regexes(ws: str) -> tuple[str, str]:
    """(object, array) regexes for any JSON object / array, containers nested at most two deep."""
    scalar = f"(?:{STRING}|{NUMBER}|true|false|null)"

    def array(value: str) -> str:
        return rf"\[{ws}(?:{value}(?:{ws},{ws}{value})*)?{ws}\]"

    def obj(value: str) -> str:
        member = f"{STRING}{ws}:{ws}{value}"
        return rf"\{{{ws}(?:{member}(?:{ws},{ws}{member})*)?{ws}\}}"

    inner = f"(?:{scalar}|{array(scalar)}|{obj(scalar)})"
    return obj(inner), array(inner)


# --------------------------------------------------------------------------- schema rewriting
class _Rewriter:
    """Walks a schema the way outlines-core dispatches on it, replacing what we render ourselves with
    placeholder consts and refusing what would be silently ignored."""

    def __init__(self, ws: str) -> None:
        self.ws = ws
        self.nonce = secrets.token_hex(6)
        self.subs: dict[str, str] = {}  # placeholder → regex
        self.patterns: list[str] = []  # user regexes inside the schema, for syntax checks

    def placeholder(self, regex: str) -> dict:
        name = f"RADIXLMSUB{self.nonce}N{len(self.subs)}"
        self.subs[name] = regex
        return {"const": name}

    def walk(self, node: Any) -> Any:
        if isinstance(node, bool):
            return node  # outlines-core reports boolean sub-schemas itself
        if not isinstance(node, dict):
            return node
        for key in _UNSUPPORTED:
            if key in node:
                raise ValueError(f"json_schema: keyword {key!r} is not supported by constrained decoding")
        if node.get("uniqueItems") is True:
            raise ValueError("json_schema: keyword 'uniqueItems' is not supported by constrained decoding")
        out = dict(node)
        for defs in ("$defs", "definitions"):
            if isinstance(node.get(defs), dict):
                out[defs] = {k: self.walk(v) for k, v in node[defs].items()}
        if not node:
            return out
        # Same dispatch order as outlines-core's parser: the first key present decides what the node means.
        if "properties" in node:
            if "minProperties" in node or "maxProperties" in node:
                raise ValueError("json_schema: 'minProperties'/'maxProperties' next to 'properties' is not supported")
            props = node["properties"]
            if isinstance(props, dict):
                missing = [r for r in node.get("required") or [] if r not in props]
                if missing:
                    raise ValueError(f"json_schema: required properties {missing} are not in 'properties'")
                out["properties"] = {k: self.walk(v) for k, v in props.items()}
            return out
        for key in ("allOf", "anyOf", "oneOf", "prefixItems"):
            if key in node:
                members = node[key]
                if key == "allOf" and isinstance(members, list) and len(members) > 1:
                    raise ValueError("json_schema: 'allOf' with more than one member is not supported")
                if isinstance(members, list):
                    out[key] = [self.walk(m) for m in members]
                return out
        if any(k in node for k in ("enum", "const", "$ref")) or "type" not in node:
            return out
        types = node["type"]
        if isinstance(types, list):
            if any(k in node for k in _BOUND_KEYS) and any(t in ("integer", "number") for t in types):
                # Render each type on its own so the bounds apply to the numeric members only.
                return self.walk({"anyOf": [{**node, "type": t} for t in types]} | (
                    {d: node[d] for d in ("$defs", "definitions") if d in node}))
            return out
        return self.walk_typed(types, node, out)

    def walk_typed(self, kind: Any, node: dict, out: dict) -> Any:
        if kind in ("integer", "number"):
            if any(node.get(k) is not None for k in _BOUND_KEYS):
                return self.placeholder(bounded_number_regex(node, integer=kind == "integer"))
        elif kind == "string":
            has_len = "minLength" in node or "maxLength" in node
            if has_len and ("pattern" in node or "format" in node):
                raise ValueError(
                    "json_schema: 'pattern'/'format' together with 'minLength'/'maxLength' is not supported")
            if isinstance(node.get("pattern"), str):
                # JSON Schema patterns search; outlines-core matches the whole string, a subset that also
                # satisfies any anchors, so drop them (one anchor alone would make the regex unsatisfiable).
                p = ascii_shorthands(node["pattern"])  # ECMA-262: \d is ASCII
                p = p[1:] if p.startswith("^") else p
                p = p[:-1] if p.endswith("$") and not p.endswith("\\$") else p
                out["pattern"] = f"^{p}$"
                self.patterns.append(p)
        elif kind == "object":
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                out["additionalProperties"] = self.walk(extra)
            elif extra in (None, True) and "minProperties" not in node and "maxProperties" not in node:
                return self.placeholder(generic_container_regexes(self.ws)[0])
        elif kind == "array":
            items = node.get("items")
            if isinstance(items, dict):
                out["items"] = self.walk(items)
            elif items is None and "minItems" not in node and "maxItems" not in node:
                return self.placeholder(generic_container_regexes(self.ws)[1])
        return out


def parse_schema(schema: str) -> dict:
    """Parse a JSON-schema string; ValueError naming the field when it is not a JSON object."""
    if not isinstance(schema, str):
        raise ValueError(f"json_schema must be a JSON string, got {type(schema).__name__}")
    try:
        obj = json.loads(schema)
    except json.JSONDecodeError as e:
        raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"json_schema must be a JSON object, got {type(obj).__name__}")
    return obj


def schema_to_regex(schema: str, whitespace_pattern: str | None = None) -> tuple[str, list[str]]:
    """Convert a JSON-schema string to a regex. Returns (regex, user sub-patterns to syntax-check).

    ``whitespace_pattern``: the regex allowed between JSON tokens (None: outlines-core's default, an optional
    single space; ``""`` gives compact JSON, which jump-forward can skip through in one go).
    """
    obj = parse_schema(schema)
    ws = WHITESPACE if whitespace_pattern is None else whitespace_pattern
    rewriter = _Rewriter(ws)
    rewritten = rewriter.walk(copy.deepcopy(obj))
    try:
        regex = build_regex_from_schema(json.dumps(rewritten), ws)
    except BaseException as e:  # outlines-core raises ValueError/TypeError, or a Rust panic
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"json_schema is not supported: {e}") from None
    for name, sub in rewriter.subs.items():
        regex = regex.replace(f'"{name}"', f"(?:{sub})")
    return regex, rewriter.patterns
