"""GenerateReqInput: SGLang's /generate body (single or batch, text or ids) — the one request model
of the native HTTP route, the ZeroMQ front door and the Engine (the OpenAI routes build one too).

It is a msgspec Struct: ``from_dict`` (untrusted JSON, or the Engine's keyword arguments) checks every
field's type and rejects unknown fields, by name; ``normalize`` then checks values and turns it into
validated ``TokenizedGenerateReq``s (batch and ``n`` expanded). Both raise ValueError naming the field.
The four logprob fields stay flat here because that is SGLang's body; ``normalize`` folds them into one
``LogprobOptions`` per sequence.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from radixlm.runtime.protocol import LogprobOptions, TokenizedGenerateReq, field_error_message
from radixlm.runtime.sampling_params import SamplingParams


class GenerateReqInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """SGLang's ``/generate`` body. A batch gives ``text`` (or ``input_ids``) as a list, and may give
    any per-prompt field as a list of the same length; anything else is shared by the batch."""

    text: str | list[str] | None = None
    # ids of one prompt, or one list of ids per prompt (msgspec allows one array type in a union)
    input_ids: list[int | list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    # SGLang's: one list of token ids (shared by a batch) or one list per prompt (or one id)
    token_ids_logprob: int | list[int | list[int]] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    priority: int | None = None  # SGLang's: one value for the whole request (--enable-priority-scheduling)
    # KV cache namespaces: requests share cached prefixes only with requests of the same pair
    cache_salt: str | list[str] | None = None  # vLLM/OpenAI's name
    extra_key: str | list[str] | None = None  # SGLang's name

    @classmethod
    def from_dict(cls, d: Any) -> "GenerateReqInput":
        """Untrusted input → GenerateReqInput; ValueError naming the field on a wrong type or name."""
        if not isinstance(d, dict):
            raise ValueError(f"the generate body must be an object, got {type(d).__name__}")
        try:
            return msgspec.convert(d, cls)
        except msgspec.ValidationError as e:
            raise ValueError(field_error_message(e)) from None

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return not isinstance(self.text, str)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    def normalize(self, tokenizer) -> list[TokenizedGenerateReq]:
        """Validate, tokenize and expand (batch × n). Raises ValueError naming the field."""
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of text or input_ids must be given")
        if self.text is not None:
            if not isinstance(self.text, (str, list)):
                raise ValueError(f"text must be a string or a list of strings, got {type(self.text).__name__}")
            texts = [self.text] if isinstance(self.text, str) else list(self.text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a non-empty list of strings")
            ids_list = [tokenizer(t).input_ids for t in texts]
        else:
            ids = self.input_ids
            if not isinstance(ids, list):
                raise ValueError(f"input_ids must be a list of ints or of lists of ints, got {type(ids).__name__}")
            ids_list = [list(x) for x in ids] if ids and isinstance(ids[0], list) else [list(ids or [])]
            if not all(all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in ids_list):
                raise ValueError("input_ids must be a list of ints or a list of lists of ints")
        nb = len(ids_list)
        for i, ids in enumerate(ids_list):
            if not ids:
                raise ValueError(f"text/input_ids[{i}]: the prompt is empty")

        def per(value, name: str) -> list:
            """One value per prompt: a batch may give a list, anything else is shared."""
            if isinstance(value, list) and self.is_batch:
                if len(value) != nb:
                    raise ValueError(f"{name}: expected {nb} entries, got {len(value)}")
                return value
            return [value] * nb

        if isinstance(self.sampling_params, list) and not self.is_batch:
            raise ValueError("sampling_params: a single prompt takes a single dict")
        sp_list = per(self.sampling_params, "sampling_params")
        rids = per(self.rid, "rid")
        if not self.is_batch and isinstance(self.rid, list):
            raise ValueError("rid: a single request takes a single rid")
        if not all(r is None or (isinstance(r, str) and r) for r in rids):
            raise ValueError("rid must be a non-empty string (or a list of them for a batch)")
        logprob = [
            LogprobOptions.from_dict({"return_logprob": rlp, "logprob_start_len": start, "top_logprobs_num": top,
                                      "token_ids_logprob": ids,
                                      "return_text_in_logprobs": self.return_text_in_logprobs})
            for rlp, start, top, ids in zip(per(self.return_logprob, "return_logprob"),
                                            per(self.logprob_start_len, "logprob_start_len"),
                                            per(self.top_logprobs_num, "top_logprobs_num"),
                                            self._token_ids_per_prompt(nb))
        ]
        salts = per(self.cache_salt, "cache_salt")
        extras = per(self.extra_key, "extra_key")
        namespaces = [cache_namespace(salts[i], extras[i]) for i in range(nb)]

        out: list[TokenizedGenerateReq] = []
        for i in range(nb):
            sp = SamplingParams.from_dict(sp_list[i])
            _validate_grammar(sp)
            base = rids[i] or uuid.uuid4().hex
            for j in range(sp.n):
                spj = sp.replace(n=1)
                if sp.n > 1 and sp.seed is not None:
                    spj = spj.replace(seed=sp.seed + j)  # n samples, not n copies of one sample
                out.append(
                    TokenizedGenerateReq(
                        rid=base if sp.n == 1 else f"{base}-{j}",
                        input_ids=ids_list[i],
                        sampling_params=spj,
                        logprob=logprob[i],
                        stream=self.stream,
                        cache_namespace=namespaces[i],
                        priority=self.priority,
                    )
                )
        if len({r.rid for r in out}) != len(out):
            raise ValueError("rid: request ids must be unique")
        return out

    def _token_ids_per_prompt(self, nb: int) -> list[list[int] | None]:
        """SGLang's shapes: an id or a flat list is every prompt's; a list of lists gives one per prompt
        (a batch only)."""
        v = self.token_ids_logprob
        if v is None or v == []:
            return [None] * nb
        if isinstance(v, int):
            return [[v]] * nb
        if all(isinstance(x, int) for x in v):
            return [list(v)] * nb
        if not all(isinstance(x, list) for x in v):
            raise ValueError("token_ids_logprob: a list of token ids, or one such list per prompt, not a mix")
        if not self.is_batch:
            raise ValueError("token_ids_logprob: a single prompt takes a flat list of token ids")
        if len(v) != nb:
            raise ValueError(f"token_ids_logprob: expected {nb} lists (one per prompt), got {len(v)}")
        return [list(x) for x in v]



MAX_CACHE_KEY_CHARS = 1024


def cache_namespace(cache_salt: str | None, extra_key: str | None) -> str:
    """The KV cache namespace of a request: "" (the shared cache) when neither field is set.

    Either field alone, or both, name a private namespace; the two are kept apart (salt "a" and
    extra_key "a" are different namespaces), unlike SGLang's plain concatenation. Raises ValueError
    naming the field for a non-string or an over-long value.
    """
    for name, v in (("cache_salt", cache_salt), ("extra_key", extra_key)):
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{name} must be a string, got {type(v).__name__}")
        if v is not None and len(v) > MAX_CACHE_KEY_CHARS:
            raise ValueError(f"{name} must be at most {MAX_CACHE_KEY_CHARS} characters")
    if not cache_salt and not extra_key:
        return ""
    return f"{cache_salt or ''}\x00{extra_key or ''}"


def _validate_grammar(sp: SamplingParams) -> None:
    """Reject a bad regex / schema here, in the caller's thread, not on the scheduler's loop."""
    from radixlm.runtime.constrained import grammar_key, validate_grammar

    key = grammar_key(sp)
    if key is not None:
        validate_grammar(*key)
