"""A compiled grammar (outlines-core Index + per-state caches) and the per-request matcher that walks it.

Masking: each grammar state's allowed tokens are computed once, on first visit, and kept either as an id
list (``index_fill_``) or, when many tokens are allowed, as a dense bool row (``|=``); both cost a few µs.

Jump-forward: a state *forces* a byte when every allowed token starts with that byte and EOS is not
allowed. Following forced bytes (through single-byte tokens) gives the forced string from a state. We read
it from the same byte-level automaton that masks, so it can never disagree with the mask (a second,
character-level regex engine could: different syntax support, multi-byte characters split across tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from outlines_core import Index

    from radixlm.runtime.constrained.vocab import TokenizerVocab

_MAX_FORCED_BYTES = 512  # a jump appends at most this much; the rest is found on the next call
_SPARSE_MAX_IDS = 1024  # above this many allowed ids (or V/8), keep a dense bool row instead of an id list


@dataclass(frozen=True)
class JumpForward:
    """Drop the last ``num_rollback`` tokens of the output (0 or 1; the dropped token's KV was never
    computed) and append ``token_ids``; together they re-encode the dropped token's text + the forced
    string the way the tokenizer would."""

    num_rollback: int
    token_ids: list[int]


@dataclass(frozen=True)
class _StateInfo:
    ids: torch.Tensor | None  # int64 [n] allowed ids (EOS included where accepting); None when dense
    dense: torch.Tensor | None  # bool [V]; None when sparse
    is_final: bool  # EOS allowed
    only_eos: bool  # final and nothing else allowed: the request should end
    forced_byte: int  # the byte every allowed token starts with, -1 if none (or final)


class CompiledGrammar:
    """An immutable compiled grammar shared by every request with the same (kind, pattern); its caches
    fill lazily as requests visit states."""

    def __init__(self, kind: str, pattern: str, regex: str, index: "Index", vocab: "TokenizerVocab") -> None:
        self.kind = kind
        self.pattern = pattern
        self.regex = regex
        self.index = index
        self.vocab = vocab
        self.initial_state: int = index.get_initial_state()
        self._eos = set(vocab.eos_token_ids)
        self._eos_ids = torch.tensor(vocab.eos_token_ids, dtype=torch.int64)
        self._info: dict[int, _StateInfo] = {}
        self._rows: dict[tuple[torch.device, int], torch.Tensor] = {}  # device copies of ids / dense rows
        self._runs: dict[int, tuple[bytes, int]] = {}
        self.state_info(self.initial_state)  # warm the first mask while still off the critical path

    def new_matcher(self) -> "GrammarMatcher":
        return GrammarMatcher(self)

    # ------------------------------------------------------------------ per-state caches
    def state_info(self, state: int) -> _StateInfo:
        info = self._info.get(state)
        if info is None:
            info = self._info[state] = self._build_info(state)
        return info

    def _build_info(self, state: int) -> _StateInfo:
        V = self.vocab.vocab_size
        allowed = torch.tensor(self.index.get_allowed_tokens(state) or [], dtype=torch.int64)
        # The pattern may end here iff the END_MARK token (id V, see vocab.END_MARK) may follow and ends it
        # (the pattern itself may also admit U+10FFFF as text, e.g. inside a JSON string).
        after = self.index.get_next_state(state, V) if bool((allowed == V).any()) else None
        is_final = after is not None and bool(self.index.is_final_state(after))
        tokens = allowed[(allowed < V) & ~torch.isin(allowed, self._eos_ids)] if allowed.numel() else allowed
        forced = -1
        if not is_final and tokens.numel():
            first = self.vocab.first_byte[tokens]
            b = int(first[0])
            if b >= 0 and bool((first == b).all()) and self.vocab.single_byte_ids[b] >= 0:
                forced = b
        ids = torch.cat([tokens, self._eos_ids]) if is_final else tokens
        if ids.numel() > min(_SPARSE_MAX_IDS, V // 8):
            dense = torch.zeros(V, dtype=torch.bool)
            dense[ids] = True
            return _StateInfo(None, dense, is_final, is_final and tokens.numel() == 0, forced)
        return _StateInfo(ids, None, is_final, is_final and tokens.numel() == 0, forced)

    def fill_mask(self, state: int, mask: torch.Tensor) -> None:
        info = self.state_info(state)
        src = info.dense if info.dense is not None else info.ids
        if mask.device != src.device:
            key = (mask.device, state)
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = src.to(mask.device)
            src = row
        if info.dense is not None:
            mask |= src
        else:
            mask.index_fill_(0, src, True)

    def next_state(self, state: int, token_id: int) -> int | None:
        return self.index.get_next_state(state, token_id)

    def forced_run(self, state: int) -> tuple[bytes, int]:
        """(bytes the grammar forces from ``state``, the state after them); empty when nothing is forced."""
        run = self._runs.get(state)
        if run is None:
            out = bytearray()
            s, seen = state, {state}
            while len(out) < _MAX_FORCED_BYTES:
                b = self.state_info(s).forced_byte
                if b < 0:
                    break
                nxt = self.index.get_next_state(s, self.vocab.single_byte_ids[b])
                if nxt is None or nxt in seen:
                    break
                out.append(b)
                seen.add(nxt)
                s = nxt
            run = self._runs[state] = (bytes(out), s)
        return run

    # ------------------------------------------------------------------ retokenization
    def walk(self, state: int, token_ids: list[int]) -> int | None:
        """The state after ``token_ids`` from ``state``, or None if some token is not allowed."""
        for t in token_ids:
            if not 0 <= t < self.vocab.vocab_size or self.vocab.token_bytes[t] is None:
                return None
            state = self.index.get_next_state(state, t)
            if state is None:
                return None
        return state

    def retokenize(self, data: bytes, state: int) -> list[int] | None:
        """Token ids spelling exactly ``data``, each allowed in turn from ``state``: the tokenizer's own
        encoding when it round-trips, else a greedy longest match over the vocabulary."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            ids = self.vocab.encode(text)
            tb = self.vocab.token_bytes
            if all(0 <= t < len(tb) and tb[t] is not None for t in ids) and b"".join(tb[t] for t in ids) == data:
                if self.walk(state, ids) is not None:
                    return ids
        return self._greedy(data, state)

    def _greedy(self, data: bytes, state: int) -> list[int] | None:
        ids: list[int] = []
        i = 0
        while i < len(data):
            for n in range(min(self.vocab.max_token_len, len(data) - i), 0, -1):
                t = self.vocab.bytes_to_id.get(data[i:i + n])
                if t is not None:
                    nxt = self.index.get_next_state(state, t)
                    if nxt is not None:
                        ids.append(t)
                        state, i = nxt, i + n
                        break
            else:
                return None
        return ids


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of ``data`` without a trailing incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # a lead byte (or ASCII): is its sequence complete?
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            return len(data) if back >= need else len(data) - back
    return len(data)


class GrammarMatcher:
    """One request's position in a compiled grammar. Mutable; used by the scheduler thread only."""

    def __init__(self, grammar: CompiledGrammar) -> None:
        self.grammar = grammar
        self.state: int = grammar.initial_state
        self.terminated = False  # EOS accepted
        self._prev_state: int | None = None  # state before the last accepted token (for jump-forward)
        self._last_token: int | None = None

    def fill_mask(self, mask: torch.Tensor) -> None:
        """Set ``mask[t] = True`` for every allowed token id. mask: bool [V] (a row of the batch mask)."""
        if mask.dtype != torch.bool or mask.shape != (self.grammar.vocab.vocab_size,):
            raise ValueError(f"mask must be a bool tensor of shape [{self.grammar.vocab.vocab_size}], "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if self.terminated:
            mask.index_fill_(0, self.grammar._eos_ids.to(mask.device), True)
            return
        self.grammar.fill_mask(self.state, mask)

    def accept_token(self, token_id: int) -> None:
        """Advance by one sampled token; ValueError if the grammar does not allow it here."""
        g = self.grammar
        if self.terminated:
            raise ValueError(f"token {token_id} after the grammar already ended with EOS")
        if token_id in g._eos:
            if not g.state_info(self.state).is_final:
                raise ValueError(f"EOS token {token_id} is not allowed before the grammar is complete")
            self.terminated = True
            self._prev_state, self._last_token = self.state, token_id
            return
        nxt = g.walk(self.state, [token_id])
        if nxt is None:
            raise ValueError(f"token {token_id} is not allowed by the grammar in state {self.state}")
        self._prev_state, self._last_token, self.state = self.state, token_id, nxt

    def is_finished(self) -> bool:
        """True when nothing but EOS can follow (or EOS was accepted): the request should end."""
        return self.terminated or self.grammar.state_info(self.state).only_eos

    def is_accepting(self) -> bool:
        """True when EOS is allowed now (the output so far is a complete match)."""
        return self.terminated or self.grammar.state_info(self.state).is_final

    def reset_to(self, state: int) -> None:
        """Put the matcher back in ``state`` (a state it passed through), e.g. when the scheduler rejects
        jump-forward tokens that greedy decoding would not have produced."""
        self.state, self.terminated, self._prev_state, self._last_token = state, False, None, None

    def jump_forward(self, last_token_id: int | None, allow_rollback: bool = True) -> JumpForward | None:
        """Tokens to append without sampling where the grammar forces text; None when nothing is forced.

        ``last_token_id`` is the token just passed to :meth:`accept_token` (its KV not computed yet), or None
        (e.g. before the first sample). Its text is re-encoded together with the forced string, so the
        result may drop it (``num_rollback == 1``), unless ``allow_rollback`` is False (the scheduler
        keeps sampled tokens of greedy requests, whose output jump-forward must not change). A trailing space is left to sampling, since BPE and
        SentencePiece attach it to the following word. The matcher is left after the new tokens.
        """
        if self.terminated:
            return None
        if last_token_id is not None and (last_token_id != self._last_token or self._prev_state is None):
            raise ValueError(f"last_token_id {last_token_id} is not the last accepted token ({self._last_token})")
        g = self.grammar
        run, _ = g.forced_run(self.state)
        run = run.rstrip(b" ")
        if not run:
            return None
        attempts: list[tuple[int, bytes, int]] = []
        if last_token_id is not None and allow_rollback:
            attempts.append((1, g.vocab.token_bytes[last_token_id], self._prev_state))
        attempts.append((0, b"", self.state))
        for rollback, prefix, base in attempts:
            data = prefix + run
            data = data[:_complete_utf8_prefix(data)]
            if len(data) <= len(prefix):
                continue
            ids = g.retokenize(data, base)
            if ids:
                break
        else:
            return None
        if rollback == 1 and ids[0] == last_token_id:  # the sampled token survives: keep its KV slot
            rollback, base, ids = 0, self.state, ids[1:]
        state, prev = base, self._prev_state
        for t in ids:
            prev, state = state, g.next_state(state, t)
        self._prev_state, self._last_token, self.state = prev, ids[-1], state
        return JumpForward(rollback, ids)
