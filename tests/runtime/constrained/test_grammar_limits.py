"""Grammar compilation is bounded and off every loop (runtime/constrained/compile_worker.py, regex_check.py).

The issue's patterns: ``a{100000}{100000}`` (22 GB before), ``a{1000}{100}`` (a Rust abort), ``a{300}{100}``
and ``(a|b)*a(a|b){18}`` (~30 s each, stalling every stream). The front's cheap check refuses what is
malformed or expands past the size bound without building anything; what passes it is built in a worker
process under a time and a memory limit, so a runaway build costs that worker, never the server.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from radixlm.runtime.constrained import GrammarBackend, validate_grammar
from radixlm.runtime.constrained.compile_worker import CompileLimits, GrammarLimitError
from radixlm.runtime.engine import Engine
from radixlm.runtime.hf_tokenizer import load_tokenizer

TIMEOUT_S = 2.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("pattern, why", [
    ("a{100000}{100000}", "invalid"),  # stacked quantifiers: not in the accepted dialect
    ("a{1000}{100}", "invalid"),
    ("a{300}{100}", "invalid"),
    ("(?:a{100000}){100000}", "expands"),
    ("(?:(?:[0-9]{1000}){1000}){10}", "expands"),
    ("x{200000,}", "expands"),
    ("(?<=a)b", "look"),
    (r"(a)\1", "back-references"),
    (r"\bword\b", "word boundaries"),
])
def test_front_check_refuses_without_building(pattern, why):
    before = _rss_mb()
    with pytest.raises(ValueError, match=rf"^regex: .*{why}"):
        validate_grammar("regex", pattern)
    assert _rss_mb() - before < 50  # nothing was built


def test_front_check_accepts_what_the_compiler_supports():
    for pattern in (r"\p{L}+", r"[0-9]{1,3}(\.[0-9]{1,3}){3}", "(a|b)*a(a|b){18}", "(?:a{300}){100}", "a{5000}"):
        validate_grammar("regex", pattern)
    validate_grammar("json", '{"type": "object", "properties": {"a": {"type": "string", "maxLength": 50}}}')
    with pytest.raises(ValueError, match="json_schema"):
        validate_grammar("json", '{"type": "string", "pattern": "(?:(?:a{1000}){1000})"}')


@pytest.fixture(scope="module")
def backend(tiny_llama):
    b = GrammarBackend(load_tokenizer(tiny_llama), 1536, compile_limits=CompileLimits(timeout_s=TIMEOUT_S))
    yield b
    b.shutdown()


@pytest.mark.slow  # starts compile worker processes and waits out their time limit
@pytest.mark.parametrize("pattern", ["(a|b)*a(a|b){18}", "(?:a{300}){100}", "(?:a{1000}){100}"])
def test_runaway_builds_hit_the_time_limit_in_the_worker(backend, pattern):
    before = _rss_mb()
    fut = backend.submit("regex", pattern)
    with pytest.raises(GrammarLimitError, match=r"^regex: .*longer than the limit"):
        fut.result(timeout=60)
    assert _rss_mb() - before < 100  # the automaton grew in the worker, not here
    # the refusal is cached (deterministic): asking again costs nothing
    assert backend.submit("regex", pattern).done()
    # a fresh worker serves the next grammar
    g = backend.compile("regex", "[0-9]{2}x")
    assert g.new_matcher() is not None


@pytest.mark.slow  # an Engine, a compile worker and its time limit
def test_engine_fails_only_the_runaway_request(tiny_llama):
    eng = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=2048,
                 grammar_compile_timeout=TIMEOUT_S)
    try:
        free = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
        solo = eng.generate("Hello there", free)["output_ids"]
        done: list[str] = []
        errors: list[Exception] = []

        def runaway():
            try:
                eng.generate("Hello", {"max_new_tokens": 4, "regex": "(a|b)*a(a|b){18}"})
            except ValueError as e:
                errors.append(e)
            done.append("runaway")

        t = threading.Thread(target=runaway)
        t.start()
        time.sleep(0.2)  # the compile is under way
        assert eng.generate("Hello there", free)["output_ids"] == solo  # decoding went on meanwhile
        done.append("free")
        t.join(60)
        assert errors and "regex" in str(errors[0]) and "limit" in str(errors[0])
        assert done == ["free", "runaway"]
        eng._wait_idle_then_check()
        assert eng.generate("Hello", {"max_new_tokens": 3, "regex": "[0-9]{3}", "temperature": 0})["text"].isdigit()
    finally:
        eng.shutdown()


@pytest.mark.slow  # the worker needs ~25 s to exhaust its address space
def test_memory_limit_kills_the_worker_not_the_process(tiny_llama):
    b = GrammarBackend(load_tokenizer(tiny_llama), 1536, compile_limits=CompileLimits(timeout_s=120, max_memory_mb=256))
    try:
        before = _rss_mb()
        with pytest.raises(GrammarLimitError, match=r"^regex: .*memory limit of 256 MB"):
            b.compile("regex", "(?:a{1000}){100}")
        assert _rss_mb() - before < 100
        assert b.compile("regex", "[a-c]{2}").new_matcher() is not None
    finally:
        b.shutdown()


def _chain_ebnf(n: int) -> str:
    """n chained rules of two alternatives: xgrammar's build (its token-mask cache) grows about
    quadratically in n (n=1000: ~2.5 s and a 59 MB result; n=3000: over 4 GB), while the front's
    syntax check stays cheap (~40 ms at n=3000)."""
    body = "\n".join(f'r{i} ::= [a-z] r{i + 1} | "q" r{i + 1}' for i in range(n))
    return f'root ::= r0\n{body}\nr{n} ::= "z"'


@pytest.mark.slow  # starts compile workers (xgrammar imports torch there) and waits out a limit
def test_ebnf_builds_are_bounded_in_the_worker(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    validate_grammar("ebnf", _chain_ebnf(3000))  # the front only parses: accepted
    timed = GrammarBackend(tok, 1536, compile_limits=CompileLimits(timeout_s=1.0))
    small = GrammarBackend(tok, 1536, compile_limits=CompileLimits(timeout_s=60, max_memory_mb=768))
    try:
        assert timed.compile("ebnf", 'root ::= "ab" [0-9]+').new_matcher() is not None  # worker up, xgrammar loaded
        before = _rss_mb()
        with pytest.raises(GrammarLimitError, match=r"^ebnf: .*longer than the limit of 1 s"):
            timed.compile("ebnf", _chain_ebnf(2000))
        assert small.compile("ebnf", 'root ::= "x" [a-c]').new_matcher() is not None
        with pytest.raises(GrammarLimitError, match=r"^ebnf: .*memory limit of 768 MB"):
            small.compile("ebnf", _chain_ebnf(3000))
        assert _rss_mb() - before < 100  # the builds grew in the workers, not here
        # fresh workers serve the next grammars, and they still constrain
        m = timed.compile("ebnf", 'root ::= "ab" [0-9]').new_matcher()
        mask = torch.zeros(1536, dtype=torch.bool)
        m.fill_mask(mask)
        allowed = {tok.decode([t]) for t in mask.nonzero().flatten().tolist()}
        assert allowed and all("ab".startswith(s) or s.startswith("ab") for s in allowed)
        assert small.compile("structural_tag", json.dumps({
            "structures": [{"begin": "<f>", "schema": {"type": "string"}, "end": "</f>"}], "triggers": ["<f>"],
        })).new_matcher() is not None
    finally:
        timed.shutdown()
        small.shutdown()


@pytest.mark.slow  # an Engine and a compile worker that hits its time limit
def test_engine_refuses_a_runaway_ebnf_and_serves_the_next(tiny_llama):
    eng = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=2048,
                 grammar_compile_timeout=1.0)
    try:
        with pytest.raises(ValueError, match=r"ebnf: .*limit"):
            eng.generate("Hello", {"max_new_tokens": 4, "ebnf": _chain_ebnf(2000)})
        eng._wait_idle_then_check()
        out = eng.generate("Hello", {"max_new_tokens": 4, "temperature": 0, "ebnf": 'root ::= [0-9] [0-9] [0-9]'})
        assert len(out["text"]) == 3 and out["text"].isdigit()
    finally:
        eng.shutdown()
