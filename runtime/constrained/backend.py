"""GrammarBackend: compiles regexes and JSON schemas for one tokenizer, off the scheduler's critical path.

One backend per tokenizer (so the cache key is just (kind, pattern)). ``submit`` returns a Future at once;
compiles run in a small thread pool, each thread handing the build to its own bounded worker process
(``compile_worker.py``: a time and a memory limit; the scheduler keeps decoding meanwhile). Compiled grammars — and compile errors, which are deterministic —
stay in an LRU cache; concurrent requests for the same pattern share one compile.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

from radixlm.runtime.constrained.grammar import CompiledGrammar
from radixlm.runtime.constrained.json_schema import schema_to_regex
from radixlm.runtime.constrained.compile_worker import CompileLimits, CompileWorker, GrammarLimitError, to_binary
from radixlm.runtime.constrained.patterns import ascii_shorthands, strip_end_anchors
from radixlm.runtime.constrained.regex_check import check_regex_cheap
from radixlm.runtime.constrained.vocab import END_MARK, TokenizerVocab, build_vocab

KINDS = ("regex", "json", "ebnf", "structural_tag")
# SamplingParams field names, for error messages
_FIELD = {"regex": "regex", "json": "json_schema", "ebnf": "ebnf", "structural_tag": "structural_tag"}
CFG_KINDS = ("ebnf", "structural_tag")  # need a context-free engine (xgrammar), not outlines-core
ENGINES = ("auto", "outlines", "xgrammar")  # --grammar-backend; auto: outlines-core, xgrammar for CFGs


def grammar_key(sp: Any) -> tuple[str, str] | None:
    """(kind, pattern) of a request's grammar (SamplingParams allows at most one), or None."""
    for kind, field in _FIELD.items():
        value = getattr(sp, field, None)
        if value is not None:
            return kind, value
    return None


def _regex_error(field: str, pattern: str, err: BaseException) -> ValueError:
    hint = ""
    try:
        re.compile(pattern)
    except re.error as e:
        hint = f": {e}"
    except Exception:  # noqa: BLE001 - the hint is best effort
        pass
    if not hint:
        hint = f" ({err}); look-around, back-references and \\b are not supported"
    return ValueError(f"{field}: invalid or unsupported regular expression {pattern!r}{hint}")


def check_regex(pattern: str, field: str = "regex") -> None:
    """Raise ValueError if ``pattern`` is malformed, uses what a DFA cannot do, or is far too large.

    Cheap (a parse, no automaton): the real build happens once, in the bounded compile worker."""
    check_regex_cheap(pattern, field)


def validate_grammar(kind: str, pattern: str, json_whitespace_pattern: str | None = None) -> None:
    """Early check without a tokenizer (e.g. in the front-end process): regex syntax, JSON parsing, schema
    support, a size bound. ValueError naming the field if bad. Builds no automaton (microseconds for a
    regex; a schema costs its translation to a regex)."""
    GrammarBackend._check_args(kind, pattern)
    if kind in CFG_KINDS:
        from radixlm.runtime.constrained.cfg import validate_cfg

        validate_cfg(kind, pattern)
    elif kind == "regex":
        check_regex(strip_end_anchors(ascii_shorthands(pattern)))
    else:
        regex, sub_patterns = schema_to_regex(pattern, json_whitespace_pattern)
        for p in sub_patterns:
            check_regex(p, field="json_schema pattern")
        check_regex(regex, field="json_schema")


class GrammarBackend:
    """Compiles and caches grammars for one tokenizer.

    tokenizer: a transformers fast tokenizer (or a ``tokenizers.Tokenizer``); vocab_size: the model's logits
    width (>= the tokenizer's vocabulary); eos_token_ids: default the tokenizer's EOS, pass the generation
    config's list when there are several; json_whitespace_pattern: the regex between JSON tokens (None:
    outlines-core's default, an optional space; "" for compact JSON, best for jump-forward).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = 64, *,
                 eos_token_ids: Sequence[int] | None = None, json_whitespace_pattern: str | None = None,
                 max_workers: int = 1, compile_limits: CompileLimits | None = None, engine: str = "auto") -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        if engine not in ENGINES:
            raise ValueError(f"grammar_backend must be one of {list(ENGINES)}, got {engine!r}")
        self.engine = engine
        self.vocab: TokenizerVocab = build_vocab(tokenizer, vocab_size, eos_token_ids)
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._xgrammar: Any = None  # XGrammarCompiler, made on first use
        self.cache_size = cache_size
        self.json_whitespace_pattern = json_whitespace_pattern
        self._cache: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="radixlm-grammar")
        # Each compile thread drives its own bounded worker process (compile_worker.py): the Index is
        # never built in this process, so no pattern can take its memory or abort it.
        self.compile_limits = compile_limits or CompileLimits()
        self._vocab_binary: bytes | None = None
        self._local = threading.local()
        self._workers: list[CompileWorker] = []

    # ------------------------------------------------------------------ public API
    def validate(self, kind: str, pattern: str) -> None:
        """Early check (no vocabulary work): regex syntax, JSON parsing, schema support. ValueError if bad."""
        validate_grammar(kind, pattern, self.json_whitespace_pattern)

    def submit(self, kind: str, pattern: str) -> "Future[CompiledGrammar]":
        """Start (or share) a compile; never blocks. A bad pattern resolves the future with ValueError."""
        try:
            self._check_args(kind, pattern)
        except ValueError as e:
            failed: Future[CompiledGrammar] = Future()
            failed.set_exception(e)
            return failed
        key = (kind, pattern)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, kind, pattern)
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # a pending future stays valid for whoever holds it
        fut.add_done_callback(lambda f, key=key: self._forget_unexpected_failure(key, f))
        return fut

    def compile(self, kind: str, pattern: str) -> CompiledGrammar:
        """Blocking compile (cached). ValueError on bad input."""
        return self.submit(kind, pattern).result()

    def shutdown(self, wait: bool = False) -> None:
        """Stop the compile threads (pending compiles still finish when ``wait``) and their workers."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        with self._lock:
            workers, self._workers = self._workers, []
        for w in workers:
            w.close()

    def _worker(self) -> CompileWorker:
        w = getattr(self._local, "worker", None)
        if w is None:
            with self._lock:
                if self._vocab_binary is None:
                    self._vocab_binary = to_binary(self.vocab.outlines)
                w = self._local.worker = CompileWorker(self._vocab_binary, self.compile_limits)
                self._workers.append(w)
        return w

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._cache), "capacity": self.cache_size}

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_args(kind: str, pattern: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{_FIELD[kind]} must be a non-empty string, got {pattern!r}")

    def _uses_xgrammar(self, kind: str) -> bool:
        if kind in CFG_KINDS:
            if self.engine == "outlines":
                raise ValueError(f"{_FIELD[kind]}: this server runs --grammar-backend outlines, which has no "
                                 "context-free grammars; start it with --grammar-backend xgrammar or auto")
            return True
        return self.engine == "xgrammar"

    def _compile_xgrammar(self, kind: str, pattern: str) -> Any:
        """Built in this thread's bounded worker like an Index (a CFG's token-mask cache can grow with the
        grammar's size times the vocabulary's), loaded here against this process's TokenizerInfo."""
        with self._lock:
            if self._xgrammar is None:
                from radixlm.runtime.constrained.cfg import XGrammarCompiler

                self._xgrammar = XGrammarCompiler(self._tokenizer, self._vocab_size, self.vocab.eos_token_ids)
        if kind == "regex":
            pattern = strip_end_anchors(ascii_shorthands(pattern))
        return self._xgrammar.compile(kind, pattern, self._worker())

    def _compile(self, kind: str, pattern: str) -> Any:
        field = _FIELD[kind]
        if self._uses_xgrammar(kind):
            return self._compile_xgrammar(kind, pattern)
        if kind == "regex":
            regex = strip_end_anchors(ascii_shorthands(pattern))
        else:
            regex, sub_patterns = schema_to_regex(pattern, self.json_whitespace_pattern)
            for p in sub_patterns:
                check_regex(p, field="json_schema pattern")
        check_regex(regex, field=field)  # cheap; also the size bound, for callers that skipped validate()
        try:
            index = self._worker().build(f"(?:{regex}){END_MARK}", field)
        except GrammarLimitError:
            raise
        except ValueError as e:  # outlines-core refused the pattern
            msg = str(e)
            if kind == "regex" and not ("incompatible" in msg or "no transitions" in msg.lower()):
                raise _regex_error(field, pattern, e) from None
            if "incompatible" in msg or "no transitions" in msg.lower():
                raise ValueError(f"{field}: the tokenizer's vocabulary cannot spell this pattern ({msg})") from None
            raise ValueError(f"{field}: cannot compile {pattern[:200]!r}: {msg}") from None
        return CompiledGrammar(kind, pattern, regex, index, self.vocab)

    def _forget_unexpected_failure(self, key: tuple[str, str], fut: Future) -> None:
        """Keep deterministic ValueErrors cached; drop anything else (MemoryError, cancellation) so a retry
        recompiles."""
        if fut.cancelled() or (fut.exception() is not None and not isinstance(fut.exception(), ValueError)):
            with self._lock:
                if self._cache.get(key) is fut:
                    del self._cache[key]
