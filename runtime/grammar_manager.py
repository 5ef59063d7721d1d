"""The scheduler's side of constrained decoding: per-request ``GrammarSlot``s, logit masks, jump-forward.

``runtime/constrained/`` compiles grammars and knows nothing of requests; this module ties them to
``Req``s: it submits compiles (off the loop), turns finished compiles into matchers, builds the
sampler's masks, appends the text a grammar forces (jump-forward) and verifies a greedy request's
forced tokens against the model. Token bookkeeping (append, truncate, finish) stays with
``OutputProcessor``, which these hooks call back.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from radixlm.runtime.sampler import apply_logit_bias
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.server_args import ServerArgs

if TYPE_CHECKING:  # annotations only: these modules import this one
    from radixlm.runtime.constrained import GrammarBackend, GrammarMatcher
    from radixlm.runtime.output_processor import OutputProcessor
    from radixlm.runtime.req import Req


class GrammarSlot:
    """A request's grammar: compiling until ``poll`` finds the compile done, then a matcher.

    A request is admitted only once its slot is ``ready``; everything after admission uses ``matcher``.
    """

    __slots__ = ("_future", "matcher")

    def __init__(self, future: "Future[Any]") -> None:
        self._future: Future[Any] | None = future
        self.matcher: GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        return self.matcher is not None

    def poll(self) -> bool:
        """True once the matcher exists. Raises the compile's error (the request fails alone)."""
        if self.matcher is None and self._future is not None and self._future.done():
            fut, self._future = self._future, None
            self.matcher = fut.result().new_matcher()
        return self.matcher is not None


# The grammar state recorded for a forced token that is scored but not checked (sampled requests).
_NO_CHECK = -1


class GrammarManager:
    """Grammar handling for one scheduler (one tokenizer, one vocabulary)."""

    def __init__(self, args: ServerArgs, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self.args = args
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self._backend: GrammarBackend | None = None  # created on first use: most deployments never constrain

    def backend(self) -> "GrammarBackend":
        if self._backend is None:
            from radixlm.runtime.constrained import GrammarBackend
            from radixlm.runtime.constrained.compile_worker import CompileLimits

            self._backend = GrammarBackend(
                self.tokenizer,
                self.vocab_size,
                cache_size=self.args.grammar_cache_size,
                eos_token_ids=sorted(self.eos_ids),
                json_whitespace_pattern=self.args.constrained_json_whitespace_pattern,
                compile_limits=CompileLimits(self.args.grammar_compile_timeout, self.args.grammar_max_memory_mb),
                engine=self.args.grammar_backend,
            )
        return self._backend

    def close(self) -> None:
        """Stop the compile threads and their worker processes."""
        if self._backend is not None:
            self._backend.shutdown(wait=False)

    def submit(self, sp: SamplingParams) -> GrammarSlot | None:
        """Start the compile for a constrained request (None when it is free); never blocks."""
        from radixlm.runtime.constrained import grammar_key

        key = grammar_key(sp)
        return None if key is None else GrammarSlot(self.backend().submit(*key))

    def poll(self, waiting: list["Req"]) -> list["Req"]:
        """Turn finished compiles into matchers. Requests whose grammar did not compile leave ``waiting``
        with an abort reason and an error; they are returned so their final output can be sent."""
        failed = []
        for r in list(waiting):
            slot = r.grammar
            if slot is None or slot.ready:
                continue
            try:
                slot.poll()
            except Exception as e:  # noqa: BLE001 - surfaced to the client as this request's error
                waiting.remove(r)
                r.error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                r.finish_reason = {"type": "abort", "message": r.error}
                failed.append(r)
        return failed

    def masks(self, reqs: list["Req"]) -> torch.Tensor | None:
        """[B, V] bool: allowed tokens, one row per request (all-true for free ones); None if none is constrained."""
        if all(r.grammar is None for r in reqs):
            return None
        masks = torch.ones((len(reqs), self.vocab_size), dtype=torch.bool)
        for i, r in enumerate(reqs):
            if r.grammar is not None:
                masks[i].fill_(False)
                r.grammar.matcher.fill_mask(masks[i])
        return masks

    def jump_forward(self, r: "Req", out: "OutputProcessor", lp_row: torch.Tensor | None = None) -> None:
        """Append the text the grammar forces, without sampling it.

        Sampled requests take the forced tokens as they are. Greedy requests must produce exactly what
        greedy decoding would, so their forced tokens are speculative: they are computed in the next
        extend and checked against the model's masked argmax there (``verify_forced``); the first
        disagreement is replaced by the model's choice and the rest is dropped.

        A sampled request that returns logprobs also holds its forced tokens back until the extend
        that computes them has scored them (``verify_forced`` without the check), so every reported
        logprob is the model's number, never a placeholder. When the sampled token is re-encoded with
        the forced text, the first new token sits where the sampled one was, so ``lp_row`` (the
        log-softmax row the sampler just drew from) scores it.
        """
        sp = r.sampling_params
        greedy = sp.is_greedy
        if greedy and (sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0):
            return  # verification below does not replay penalties; such requests simply decode
        held = greedy or r.logprob.return_logprob  # tokens wait in r.forced for the logits that score them
        matcher = r.grammar.matcher
        state = matcher.state
        jf = matcher.jump_forward(r.output_ids[-1] if r.output_ids else None, allow_rollback=not greedy)
        if jf is None or not jf.token_ids:
            return
        # The dropped token was sampled but not computed yet, so no KV needs to be given back.
        if jf.num_rollback:  # only sampled requests roll back (see allow_rollback above)
            out.truncate(r, r.seq_len - jf.num_rollback)
        room = sp.max_new_tokens - len(r.output_ids)
        tokens = jf.token_ids[:room]
        if len(tokens) < len(jf.token_ids):  # the budget cut the run: put the matcher after what we keep
            g = matcher.grammar
            matcher.reset_to(g.walk(g.walk(g.initial_state, r.output_ids), tokens))
        for i, tok in enumerate(tokens):
            scored_now = i == 0 and jf.num_rollback > 0 and r.logprob.return_logprob
            if greedy:
                r.forced.append((r.seq_len, state))
                state = matcher.grammar.next_state(state, tok)
            elif held and not scored_now:  # a sampled request keeps the token whatever the model says
                r.forced.append((r.seq_len, _NO_CHECK))
            r.output_ids.append(tok)
            out.counters.total_generated += 1
            if scored_now:
                assert lp_row is not None, "a sampled token with logprobs comes with its row"
                out.push_logprobs(r, tok, lp_row)
            elif r.logprob.return_logprob:  # placeholders, replaced in verify_forced before anything is sent
                out.push_logprobs(r, tok, None)
        if not held:
            reason = out.check_finish(r, r.output_ids[-1])
            if reason is not None:
                out.finish(r, reason)

    def verify_forced(self, r: "Req", logits: torch.Tensor, checks: list[tuple[int, int, int]],
                      out: "OutputProcessor") -> None:
        """Check a greedy request's forced tokens against the logits before each, and score them:
        ``checks`` holds (index in all_ids, grammar state before it or ``_NO_CHECK``, logits row).
        A sampled request's tokens (``_NO_CHECK``) are only scored."""
        n_in = len(r.input_ids)
        lp = torch.log_softmax(logits[[row for _, _, row in checks]], dim=-1) if r.logprob.return_logprob else None
        for k, (idx, state, row) in enumerate(checks):
            out_pos = idx - n_in
            forced_tok = r.output_ids[out_pos]
            choice = forced_tok if state == _NO_CHECK else self._greedy_choice(r, logits[row], state, out_pos)
            if choice != forced_tok:
                out.truncate(r, idx)
                r.grammar.matcher.reset_to(state)
                if r.logprob.return_logprob:
                    out.push_logprobs(r, choice, lp[k])
                out.append_token(r, choice, lp[k] if lp is not None else None)
                return
            r.forced.pop(0)
            if r.logprob.return_logprob:
                out.push_logprobs(r, forced_tok, lp[k], at=out_pos - r.sent_len)
            reason = out.check_finish(r, forced_tok, upto=out_pos + 1)
            if reason is None and not r.forced and r.grammar.matcher.is_finished():
                reason = {"type": "stop", "matched": None}
            if reason is not None:
                out.truncate(r, idx + 1)
                out.finish(r, reason)
                return

    def _greedy_choice(self, r: "Req", logits: torch.Tensor, state: int, out_len: int) -> int:
        """What the sampler would pick for a greedy request at grammar ``state`` (no penalties)."""
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        r.grammar.matcher.grammar.fill_mask(state, allowed)
        sp = r.sampling_params
        logits = apply_logit_bias(logits, [sp]).masked_fill(~allowed, float("-inf"))
        if out_len < sp.min_new_tokens:
            banned = list(sp.stop_token_ids or []) + ([] if sp.ignore_eos else sorted(self.eos_ids))
            if banned:
                logits[banned] = float("-inf")
        return int(logits.argmax())
