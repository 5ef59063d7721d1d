"""Regexes and JSON schemas for constrained-decoding tests, shared by the grammar tests, the engine tests and
benchmarks/bench_constrained.py; plus ``output_is_valid`` and ``Walker`` (random walks over allowed tokens).

Every regex here means the same in Python's ``re`` and in outlines-core's Rust syntax (with ``\\d`` ASCII,
see radixlm.runtime.constrained.patterns), so ``output_is_valid`` can check outputs with ``re.fullmatch``.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import deque
from typing import Literal, Optional

import jsonschema
import torch
from pydantic import BaseModel, Field

from radixlm.runtime.constrained import CompiledGrammar, JumpForward

_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

REGEX_CASES: dict[str, str] = {
    "ipv4": rf"({_OCTET}\.){{3}}{_OCTET}",
    "iso_date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "us_phone": r"\(\d{3}\) \d{3}-\d{4}",
    "enum_colors": r"(red|green|blue|yellow)",
    "nested_groups": r"((ab|cd)(ef|g(h|i))?-){1,3}(x|y)",
    "email_like": r"[a-z]{1,8}(\.[a-z]{1,8})?@[a-z]{2,8}\.(com|org|net)",
    "time_24h": r"([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?",
    "decimal": r"-?(0|[1-9]\d{0,5})\.\d{1,3}",
    "forced_sentence": r"The answer is (yes|no), because [a-z ]{1,20}\.",
    "unicode_words": r"(café|naïve|日本語|😀)( (café|naïve|日本語|😀)){0,2}",
    "hex_color": r"#[0-9a-fA-F]{6}",
    "string_list": r'\[("[a-z]{1,5}"(, "[a-z]{1,5}"){0,3})?\]',
    "semver": r"v\d{1,3}\.\d{1,3}\.\d{1,3}(-(alpha|beta|rc)\d?)?",
}


class _Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{2}\d{3}$")
    quantity: int = Field(ge=1, le=99)


class _Order(BaseModel):
    """A pydantic model, as a user would pass it (SamplingParams turns it into a JSON string)."""

    order_id: int = Field(ge=1000, lt=10000)
    status: Literal["pending", "shipped", "delivered"]
    items: list[_Item] = Field(min_length=1, max_length=2)
    note: Optional[str] = Field(default=None, max_length=12)


JSON_SCHEMA_CASES: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "format": "email"},
        },
        "required": ["name", "age"],
    },
    "nested_objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 10},
                                       "zip": {"type": "string", "pattern": r"^\d{5}$"}},
                        "required": ["city", "zip"],
                    },
                },
                "required": ["id", "address"],
            },
        },
        "required": ["user"],
    },
    "array_min_max": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 4},
        },
        "required": ["tags", "scores"],
    },
    "enums": {
        "type": "object",
        "properties": {
            "status": {"enum": ["active", "inactive", "banned"]},
            "priority": {"enum": [1, 2, 3]},
            "level": {"type": "string", "enum": ["low", "high"]},
        },
        "required": ["status", "priority", "level"],
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "minimum": -50, "maximum": 50},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "score": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10},
            "year": {"type": "integer", "minimum": 1900, "exclusiveMaximum": 2100},
            "offset": {"type": "number", "exclusiveMinimum": -2.5, "exclusiveMaximum": 7.25},
        },
        "required": ["temperature", "ratio", "score", "year", "offset"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": {"type": "integer"},
            "c": {"type": "string", "maxLength": 4},
        },
    },
    "ref_defs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                               "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                "required": ["x", "y"],
            },
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "string_patterns": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": r"^[A-Z]{3}-\d{3}$"},
            "day": {"type": "string", "format": "date"},
            "slug": {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$"},
            "ref": {"type": "string", "pattern": r"^id-\d{2}"},  # one anchor only: JSON Schema searches
        },
        "required": ["code", "day", "slug", "ref"],
    },
    "any_of_nullable": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}, {"type": "null"}]},
            "maybe": {"type": ["string", "null"], "maxLength": 4},
        },
        "required": ["value", "maybe"],
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1}, "label": {"enum": ["x", "y", "z"]}},
            "required": ["id", "label"],
        },
        "minItems": 2,
        "maxItems": 4,
    },
    "const_and_bool": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "ok": {"type": "boolean"}, "count": {"type": "integer"}},
        "required": ["kind", "ok", "count"],
    },
    "json_object": {"type": "object"},
    "pydantic_order": _Order.model_json_schema(),
}

BAD_REGEXES: dict[str, str] = {
    "unclosed_group": "([a-z]+",
    "unclosed_class": "[a-z",
    "bad_repeat": "a{3,1}",
    "lookbehind": "(?<=a)b",
    "backreference": r"(a)\1",
    "nothing_to_repeat": "*abc",
}

BAD_SCHEMAS: dict[str, str] = {
    "not_json": "{not json",
    "not_an_object": "[1, 2]",
    "unknown_type": '{"type": "foo"}',
    "missing_ref": '{"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}',
    "unknown_format": '{"type": "string", "format": "not-a-format"}',
    "unique_items": '{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}',
    "multiple_of": '{"type": "integer", "multipleOf": 3}',
    "required_not_in_properties": '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}',
    "empty_bounds": '{"type": "integer", "minimum": 5, "maximum": 3}',
    "bad_pattern": '{"type": "string", "pattern": "([a-z"}',
    "min_properties_with_properties":
        '{"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1}',
}


def schema_json(name: str) -> str:
    return json.dumps(JSON_SCHEMA_CASES[name])


def output_is_valid(kind: str, pattern: str, text: str) -> bool:
    """True when ``text`` fully matches the regex / parses as JSON and validates against the schema."""
    if kind == "regex":
        return re.fullmatch(pattern, text) is not None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    try:
        jsonschema.validate(value, json.loads(pattern))
    except jsonschema.ValidationError:
        return False
    return True


class Walker:
    """Samples allowed tokens at random, biased half the time towards the nearest accepting state so every
    walk ends (a uniform walk inside a JSON string almost never closes it)."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.g = grammar
        self.eos = set(grammar.vocab.eos_token_ids)
        V = grammar.vocab.vocab_size  # token V is the END_MARK (vocab.END_MARK): not a real token
        trans = {s: {t: n for t, n in edges.items() if t < V}
                 for s, edges in grammar.index.get_transitions().items()}  # {state: {token: next}}
        parents: dict[int, list[int]] = {}
        for s, edges in trans.items():
            for t, nxt in edges.items():
                if t not in self.eos:
                    parents.setdefault(nxt, []).append(s)
        self.dist = {s: 0 for s in trans if grammar.state_info(s).is_final}
        queue = deque(self.dist)
        while queue:
            s = queue.popleft()
            for p in parents.get(s, ()):
                if p not in self.dist:
                    self.dist[p] = self.dist[s] + 1
                    queue.append(p)
        self.trans = trans
        self._closer: dict[int, list[int]] = {}

    def closer(self, state: int) -> list[int]:
        if state not in self._closer:
            d = self.dist[state]
            self._closer[state] = [t for t, n in self.trans[state].items()
                                   if t not in self.eos and self.dist.get(n, d) < d]
        return self._closer[state]

    def walk(self, rng: random.Random, jump_forward: bool, max_tokens: int = 400,
             timings: dict[str, list[int]] | None = None) -> tuple[list[int], bool, int]:
        """(output token ids, finished, number of jumps). ``timings`` collects ns per fill_mask / accept_token /
        jump_forward call (for benchmarks)."""
        m = self.g.new_matcher()
        mask = torch.zeros(self.g.vocab.vocab_size, dtype=torch.bool)
        out: list[int] = []
        jumps = 0
        clock = time.perf_counter_ns

        def timed(name: str, fn, *args):
            if timings is None:
                return fn(*args)
            t0 = clock()
            result = fn(*args)
            timings.setdefault(name, []).append(clock() - t0)
            return result

        def jump(last: int | None) -> None:
            nonlocal jumps
            jf = timed("jump_forward", m.jump_forward, last)
            if jf is None:
                return
            assert isinstance(jf, JumpForward) and jf.num_rollback in (0, 1) and jf.token_ids
            if jf.num_rollback:
                assert out and out[-1] == last
                out.pop()
            out.extend(jf.token_ids)
            jumps += 1
            # The matcher's state is exactly where the new token sequence leads.
            assert self.g.walk(self.g.initial_state, out) == m.state

        if jump_forward:
            jump(None)
        while len(out) < max_tokens:
            if m.is_finished():
                return out, True, jumps
            mask.zero_()
            timed("fill_mask", m.fill_mask, mask)
            allowed = mask.nonzero().flatten().tolist()
            assert allowed, "a live grammar state must allow some token"
            assert all(t < len(self.g.vocab.token_bytes) and (t in self.eos or self.g.vocab.token_bytes[t])
                       for t in allowed)
            if self.eos & set(allowed) and rng.random() < 0.3:
                m.accept_token(rng.choice(sorted(self.eos & set(allowed))))
                assert m.is_finished()
                return out, True, jumps
            candidates = [t for t in allowed if t not in self.eos]
            if rng.random() < 0.5 and self.closer(m.state):
                candidates = self.closer(m.state)
            t = rng.choice(candidates)
            timed("accept_token", m.accept_token, t)
            out.append(t)
            if jump_forward:
                jump(t)
        return out, False, jumps
