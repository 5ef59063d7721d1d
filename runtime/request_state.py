"""RequestState: one sequence's results as the front end assembles them (the Engine and the server's
detokenizer process both use it, so the two front doors produce the same bytes).

It folds the scheduler's per-step ``ReqOutput``s into SGLang-shaped results: text (incremental, UTF-8
safe, stop strings trimmed), output ids, and ``meta_info`` with logprobs as
``(logprob, token_id, text|None)``. ``meta_info`` is shaped in one place (``_meta_info``) for both
kinds of answer: ``result()`` (everything so far: final results and the Engine's stream chunks) and
``delta()`` (what one step added: the server's stream deltas).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from radixlm.runtime.incremental_detokenizer import IncrementalDetokenizer
from radixlm.runtime.protocol import ReqOutput, TokenizedGenerateReq, TokenLogprob
from radixlm.runtime.sampling_params import UNBOUNDED, SamplingParams


@dataclass
class RequestState:
    """Everything the front end knows about one sequence while it runs."""

    req: TokenizedGenerateReq
    tokenizer: Any
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: dict | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    input_token_logprobs: list[TokenLogprob] = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_token_logprobs: list[TokenLogprob] = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    input_token_ids_logprobs: list = field(default_factory=list)
    output_token_ids_logprobs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        sp = self.req.sampling_params
        self.detok = IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens, sp.spaces_between_special_tokens)
        self.prompt_tokens = len(self.req.input_ids)

    @property
    def rid(self) -> str:
        return self.req.rid

    def update(self, out: ReqOutput) -> None:
        self.output_ids.extend(out.new_token_ids)
        self.completion_tokens = out.completion_tokens or len(self.output_ids)
        self.cached_tokens = out.cached_tokens
        self.input_token_logprobs.extend(out.input_token_logprobs or ())
        self.input_top_logprobs.extend(out.input_top_logprobs or ())
        self.output_token_logprobs.extend(out.output_token_logprobs or ())
        self.output_top_logprobs.extend(out.output_top_logprobs or ())
        self.input_token_ids_logprobs.extend(out.input_token_ids_logprobs or ())
        self.output_token_ids_logprobs.extend(out.output_token_ids_logprobs or ())
        if out.error:
            self.error = out.error
        ids = out.new_token_ids
        if out.finished and _stopped_on_token(out.finish_reason, self.req.sampling_params):
            ids = ids[:-1]  # the matched stop token is not part of the text
        self.detok.add(ids)
        if out.finished:
            self.detok.flush()
            self.finished = True
            self.finish_reason = out.finish_reason

    # ------------------------------------------------------------------ text
    def text(self) -> str:
        """Final-form text so far: a matched stop string (and what follows it) removed."""
        text = self.detok.text
        sp = self.req.sampling_params
        fr = self.finish_reason or {}
        matched = fr.get("matched")
        if self.finished and isinstance(matched, str) and not sp.no_stop_trim:
            if sp.stop and matched in sp.stop:
                idx = text.find(matched)
            else:  # a stop_regex pattern: trimmed at its first match, like a stop string
                m = re.search(matched, text) if sp.stop_regex and matched in sp.stop_regex else None
                idx = m.start() if m else -1
            if idx >= 0:
                text = text[:idx]
        return text

    def stream_text(self) -> str:
        """Text safe to show now: holds back a tail that may still grow into a stop string."""
        text = self.text()
        sp = self.req.sampling_params
        if self.finished or not (sp.stop or sp.stop_regex):
            return text
        hold = 0
        if sp.stop_regex:
            # Any of the last (width - 1) characters may still start a match: hold them back (all of
            # the text for a pattern of unbounded width), so streamed text is never retracted.
            hold = min(sp.stop_regex_window - 1, len(text)) if sp.stop_regex_window < UNBOUNDED else len(text)
        for s in sp.stop or ():
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold] if hold else text

    # ------------------------------------------------------------------ result
    def _lp(self, entries: list[TokenLogprob] | None) -> list:
        """SGLang's logprob entries: (logprob, token_id, text or None)."""
        if not entries:
            return []
        if self.req.logprob.return_text_in_logprobs:
            return [(e.logprob, e.token_id, self.tokenizer.decode([e.token_id])) for e in entries]
        return [(e.logprob, e.token_id, None) for e in entries]

    def _meta_info(self, input_lp, input_top, output_lp, output_top, input_ids_lp=(), output_ids_lp=()) -> dict[str, Any]:
        """SGLang's ``meta_info`` with the given logprob entries (all so far, or one step's)."""
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }
        opts = self.req.logprob
        if opts.return_logprob:
            meta["input_token_logprobs"] = self._lp(input_lp)
            meta["output_token_logprobs"] = self._lp(output_lp)
            if opts.top_logprobs_num:
                meta["input_top_logprobs"] = [None if e is None else self._lp(e) for e in (input_top or ())]
                meta["output_top_logprobs"] = [None if e is None else self._lp(e) for e in (output_top or ())]
            if opts.token_ids_logprob:  # SGLang: per position, (logprob, id, text|None) for exactly those ids
                meta["input_token_ids_logprobs"] = [self._lp(e) or None for e in (input_ids_lp or ())]
                meta["output_token_ids_logprobs"] = [self._lp(e) or None for e in (output_ids_lp or ())]
        if self.error:
            meta["error"] = self.error
        return meta

    def result(self, streaming: bool = False) -> dict:
        """Everything so far (``streaming``: text held back where a stop string may still match)."""
        meta = self._meta_info(self.input_token_logprobs, self.input_top_logprobs,
                               self.output_token_logprobs, self.output_top_logprobs,
                               self.input_token_ids_logprobs, self.output_token_ids_logprobs)
        return {
            "text": self.stream_text() if streaming else self.text(),
            "output_ids": list(self.output_ids),
            "meta_info": meta,
        }

    def delta(self, out: ReqOutput, sent: int) -> dict:
        """What a streaming client has not seen after ``update(out)``: the text past ``sent`` characters
        (``len(stream_text())`` before the update), ``out``'s ids and logprob entries."""
        meta = self._meta_info(out.input_token_logprobs, out.input_top_logprobs,
                               out.output_token_logprobs, out.output_top_logprobs,
                               out.input_token_ids_logprobs, out.output_token_ids_logprobs)
        return {"text": self.stream_text()[sent:], "output_ids": list(out.new_token_ids), "meta_info": meta}


def _stopped_on_token(finish_reason: dict | None, sp: SamplingParams) -> bool:
    return bool(finish_reason) and isinstance(finish_reason.get("matched"), int) and not sp.no_stop_trim
