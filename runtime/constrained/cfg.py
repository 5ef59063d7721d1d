"""Context-free grammars through xgrammar: ``ebnf`` (SGLang's GBNF-style EBNF, root rule ``root``),
``structural_tag`` (SGLang's legacy ``{"structures", "triggers"}`` form or xgrammar's ``format`` form),
and, with ``--grammar-backend xgrammar``, regexes and JSON schemas too.

``XGrammarCompiled`` / ``XGrammarMatcher`` have the interface the scheduler uses for outlines-core
grammars (``runtime/constrained/grammar.py``), so ``GrammarManager`` drives both the same way. A
matcher's *state* is the number of tokens it has accepted: xgrammar matchers are stateful and roll
back, so "go back to state k" is a rollback of ``len - k`` tokens, and "the mask at state k" rolls
back, fills the mask and re-accepts (only greedy jump-forward verification asks for a past state).

Jump-forward: ``find_jump_forward_string`` gives the text the grammar forces; it is re-encoded with
the tokenizer (together with the token just sampled, for sampled requests) and accepted token by
token, so the forced tokens are always ones the grammar allows.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

import torch

from radixlm.runtime.constrained.grammar import JumpForward, _complete_utf8_prefix

if TYPE_CHECKING:
    from radixlm.runtime.constrained.compile_worker import CompileWorker

_FIELD = {"ebnf": "ebnf", "structural_tag": "structural_tag", "regex": "regex", "json": "json_schema"}
_MAX_JUMP_CHARS = 512


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - xgrammar is a dependency
        raise ValueError(f"context-free grammars need the xgrammar package ({e})") from None
    return xgrammar


def _structural_tag_job(pattern: str) -> tuple[str, str]:
    """The compile-worker job (kind, pattern) for SGLang's two spellings of a structural tag: the legacy
    ``{"structures", "triggers"}`` form as plain ``{"tags": [[begin, schema, end]], "triggers"}`` JSON
    (the worker makes the StructuralTagItems), xgrammar's ``format`` form as it is."""
    spec = json.loads(pattern)
    if isinstance(spec, dict) and "structures" in spec:  # SGLang's legacy form
        triggers = spec.get("triggers")
        if not isinstance(triggers, list) or not all(isinstance(t, str) and t for t in triggers):
            raise ValueError("structural_tag: triggers must be a list of non-empty strings")
        tags = []
        for i, s in enumerate(spec["structures"]):
            if not isinstance(s, dict) or not {"begin", "schema", "end"} <= set(s):
                raise ValueError(f"structural_tag: structures[{i}] needs begin, schema and end")
            schema = s["schema"] if isinstance(s["schema"], str) else json.dumps(s["schema"])
            tags.append([s["begin"], schema, s["end"]])
        return "structural_tag_legacy", json.dumps({"tags": tags, "triggers": triggers})
    return "structural_tag", pattern


def _structural_tag_args(pattern: str) -> tuple[tuple, dict]:
    """Arguments of ``Grammar.from_structural_tag`` (the front's syntax check)."""
    kind, job = _structural_tag_job(pattern)
    if kind == "structural_tag":
        return (pattern,), {}
    spec = json.loads(job)
    tags = [_xgr().StructuralTagItem(begin=b, schema=sc, end=e) for b, sc, e in spec["tags"]]
    return (tags, spec["triggers"]), {}


def validate_cfg(kind: str, pattern: str) -> None:
    """Syntax check without a tokenizer; ValueError naming the field."""
    xgr = _xgr()
    try:
        if kind == "ebnf":
            xgr.Grammar.from_ebnf(pattern)
        else:
            args, kw = _structural_tag_args(pattern)
            xgr.Grammar.from_structural_tag(*args, **kw)
    except ValueError as e:
        if str(e).startswith(kind):
            raise
        raise ValueError(f"{_FIELD[kind]}: {_short(e)}") from None
    except Exception as e:  # noqa: BLE001 - xgrammar reports syntax errors as RuntimeError
        raise ValueError(f"{_FIELD[kind]}: {_short(e)}") from None


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return msg.split("] ", 1)[-1][:300]


class XGrammarCompiler:
    """One per tokenizer: xgrammar's tokenizer info. Grammars are built in a bounded compile worker
    (``compile_worker.py``) from this info's JSON and loaded back against it, never built here."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        xgr = self._xgr = _xgr()
        hf = getattr(tokenizer, "hf_tokenizer", tokenizer)
        self.tokenizer = hf
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=self.eos_token_ids)
        self.info_json = self.info.serialize_json()  # what the compile worker builds its TokenizerInfo from

    def compile(self, kind: str, pattern: str, worker: "CompileWorker") -> "XGrammarCompiled":
        """Build in ``worker`` (bounded), load here. ValueError naming the field when xgrammar refuses the
        grammar; GrammarLimitError (a ValueError, also naming it) when the build hits a limit."""
        from radixlm.runtime.constrained.compile_worker import GrammarLimitError

        field = _FIELD.get(kind, kind)
        try:
            job_kind, job = _structural_tag_job(pattern) if kind == "structural_tag" else (kind, pattern)
            data = worker.build_xgrammar(job_kind, job, field, self.info_json)
            compiled = self._xgr.CompiledGrammar.deserialize_json(data, self.info)
        except GrammarLimitError:
            raise
        except ValueError as e:
            if str(e).startswith(_FIELD.get(kind, kind)):
                raise
            raise ValueError(f"{_FIELD.get(kind, kind)}: {_short(e)}") from None
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{_FIELD.get(kind, kind)}: {_short(e)}") from None
        return XGrammarCompiled(kind, pattern, compiled, self)


class XGrammarCompiled:
    """A compiled xgrammar grammar, shared by every request with the same (kind, pattern)."""

    initial_state = 0

    def __init__(self, kind: str, pattern: str, compiled: Any, owner: XGrammarCompiler) -> None:
        self.kind = kind
        self.pattern = pattern
        self.compiled = compiled
        self.owner = owner
        self.vocab_size = owner.vocab_size

    def new_matcher(self) -> "XGrammarMatcher":
        return XGrammarMatcher(self)


class _MatcherView:
    """``matcher.grammar`` for the scheduler: state arithmetic over one matcher's token count."""

    initial_state = 0

    def __init__(self, m: "XGrammarMatcher") -> None:
        self._m = m

    def next_state(self, state: int, token_id: int) -> int:
        return state + 1

    def walk(self, state: int, token_ids: list[int]) -> int:
        return state + len(token_ids)

    def fill_mask(self, state: int, mask: torch.Tensor) -> None:
        self._m.fill_mask_at(state, mask)


class XGrammarMatcher:
    """One request's position; used by the scheduler thread only."""

    def __init__(self, grammar: XGrammarCompiled) -> None:
        xgr = _xgr()
        self._xgr = xgr
        self.compiled = grammar
        self.m = xgr.GrammarMatcher(grammar.compiled, max_rollback_tokens=-1)
        self.history: list[int] = []  # accepted tokens (EOS included once terminated)
        self.grammar = _MatcherView(self)
        V = grammar.vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, V)
        self._bits = torch.arange(32, dtype=torch.int32)
        self._cached: tuple[int, torch.Tensor] | None = None  # (state, bool row) of the last mask
        self._eos = set(grammar.owner.eos_token_ids)

    @property
    def state(self) -> int:
        return len(self.history)

    @property
    def terminated(self) -> bool:
        return self.m.is_terminated()

    # ------------------------------------------------------------------ masks
    def _allowed(self) -> torch.Tensor:
        """bool [V]: tokens allowed now (cached per state)."""
        if self._cached is not None and self._cached[0] == self.state:
            return self._cached[1]
        self.m.fill_next_token_bitmask(self._bitmask)
        V = self.compiled.vocab_size
        row = ((self._bitmask[0].unsqueeze(-1) >> self._bits) & 1).bool().flatten()[:V]
        self._cached = (self.state, row)
        return row

    def fill_mask(self, mask: torch.Tensor) -> None:
        """Set ``mask[t] = True`` for every allowed token id (mask: bool [V])."""
        mask |= self._allowed().to(mask.device)

    def fill_mask_at(self, state: int, mask: torch.Tensor) -> None:
        """The mask at an earlier state (greedy jump-forward verification)."""
        if state == self.state:
            self.fill_mask(mask)
            return
        later = self.history[state:]
        self.m.rollback(len(later))
        del self.history[state:]
        self._cached = None
        try:
            self.fill_mask(mask)
        finally:
            for t in later:
                self._accept(t)

    # ------------------------------------------------------------------ tokens
    def _accept(self, token_id: int) -> bool:
        if not self.m.accept_token(token_id):
            return False
        self.history.append(token_id)
        self._cached = None
        return True

    def accept_token(self, token_id: int) -> None:
        if self.terminated:
            raise ValueError(f"token {token_id} after the grammar already ended with EOS")
        if not self._accept(token_id):
            raise ValueError(f"token {token_id} is not allowed by the grammar here")

    def is_finished(self) -> bool:
        """Nothing but EOS can follow (or EOS was accepted)."""
        if self.terminated:
            return True
        if not self.m.is_completed():  # the grammar cannot end here: more text must come
            return False
        allowed = self._allowed()
        eos = [t for t in self._eos if t < allowed.numel()]
        others = int(allowed.sum()) - int(allowed[eos].sum()) if eos else int(allowed.sum())
        return others == 0

    def is_accepting(self) -> bool:
        if self.terminated:
            return True
        allowed = self._allowed()
        return any(bool(allowed[t]) for t in self._eos if t < allowed.numel())

    def reset_to(self, state: int) -> None:
        n = self.state - state
        if n < 0:
            raise ValueError(f"cannot reset forward (state {self.state} → {state})")
        if n:
            self.m.rollback(n)
            del self.history[state:]
            self._cached = None

    # ------------------------------------------------------------------ jump-forward
    def _encode(self, text: str) -> list[int]:
        return list(self.compiled.owner.tokenizer(text, add_special_tokens=False).input_ids)

    def _try_accept(self, ids: list[int]) -> bool:
        done = 0
        for t in ids:
            if t in self._eos or not self._accept(t):
                break
            done += 1
        if done == len(ids):
            return True
        if done:
            self.m.rollback(done)
            del self.history[len(self.history) - done:]
            self._cached = None
        return False

    def jump_forward(self, last_token_id: int | None, allow_rollback: bool = True) -> JumpForward | None:
        """Tokens to append without sampling where the grammar forces text (see the module doc)."""
        if self.terminated:
            return None
        forced = self.m.find_jump_forward_string()[:_MAX_JUMP_CHARS].rstrip(" ")
        if not forced:
            return None
        if last_token_id is not None and allow_rollback and self.history and self.history[-1] == last_token_id:
            tok = self.compiled.owner.tokenizer
            prev = tok.decode([last_token_id])
            data = (prev + forced).encode()
            text = data[:_complete_utf8_prefix(data)].decode("utf-8", errors="ignore")
            ids = self._encode(text)
            if ids and tok.decode(ids) == prev + forced:
                self.m.rollback(1)
                self.history.pop()
                self._cached = None
                if self._try_accept(ids):
                    if ids[0] == last_token_id:  # the sampled token survives: keep its KV slot
                        return JumpForward(0, ids[1:]) if len(ids) > 1 else None
                    return JumpForward(1, ids)
                self._accept(last_token_id)
        ids = self._encode(forced)
        if ids and self._try_accept(ids):
            return JumpForward(0, ids)
        return None
