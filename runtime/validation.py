"""Request validation: the one place that decides whether a request may enter the server.

Every front door (HTTP native and OpenAI, the ZeroMQ front door, the in-process ``Engine`` and so the
DSL) calls the same two functions, in this order, before anything is registered, tokenized in bulk or
sent to another process:

* ``check_admission(obj, limits)`` on the raw ``GenerateReqInput``: counts (prompts, ``n``, sequences),
  string encodability and sizes, so an oversized request costs nothing (no tokenization, no expansion).
* ``check_requests(reqs, limits)`` on the normalized ``TokenizedGenerateReq``s: every integer within
  int64 and its semantic range (token ids, ``stop_token_ids`` and ``top_k`` within the vocabulary,
  ``logprob_start_len`` within the prompt, ``top_logprobs_num``), every list bounded, every string
  UTF-8 encodable (no lone surrogates), ``SamplingParams.verify`` for the per-field ranges.

The scheduler runs ``check_request`` again on what it receives (cheap; it is the last line of defence
for messages from any front end). Everything raises ``ValueError`` whose message starts with the field's
name, which each front door maps to its error shape (HTTP 400 with ``param``, a ZeroMQ ``ClientError``).
Limits come from server flags through ``RequestLimits.from_args``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from radixlm.runtime.generate_request import GenerateReqInput
    from radixlm.runtime.protocol import TokenizedGenerateReq
    from radixlm.runtime.server_args import ServerArgs

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Fixed bounds (not flags): far above any legitimate use, low enough that no check below is costly.
MAX_RID_CHARS = 512
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 4096
MAX_TOP_LOGPROBS = 1024
MAX_LIST_ITEMS = 4096  # any other list or dict field of SamplingParams
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_JSON_DEPTH = 100  # JSON bodies and JSON schemas: deeper nesting is refused (parsers recurse)  # a regex or JSON schema; the compile worker bounds the automaton itself


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for; built from server flags and the model's sizes."""

    vocab_size: int | None = None  # None: token ids are checked by the scheduler only
    context_len: int | None = None
    max_n: int = 128
    max_prompts_per_request: int = 1024
    max_sequences_per_request: int = 1024  # prompts × n
    max_prompt_tokens: int | None = None  # None: the context length
    # A text prompt longer than this (in characters) cannot fit in max_prompt_tokens tokens: refused
    # before tokenizing it (a 10 MB prompt took 21 s to tokenize only to be refused)
    max_prompt_chars: int | None = None
    # False with --abort-on-priority-when-disabled and no --enable-priority-scheduling: a priority is refused
    priority_allowed: bool = True

    @classmethod
    def from_args(cls, args: "ServerArgs", vocab_size: int | None, context_len: int | None,
                  tokenizer: Any = None) -> "RequestLimits":
        max_prompt = args.max_prompt_tokens or None
        if context_len is not None:
            max_prompt = min(max_prompt or context_len, context_len)
        longest = longest_token_chars(tokenizer) if tokenizer is not None else None
        return cls(
            max_prompt_chars=None if (max_prompt is None or not longest) else 2 * max_prompt * longest,
            vocab_size=vocab_size,
            context_len=context_len,
            max_n=args.max_n,
            max_prompts_per_request=args.max_prompts_per_request,
            max_sequences_per_request=args.max_prompts_per_request,
            max_prompt_tokens=max_prompt,
            priority_allowed=args.enable_priority_scheduling or not args.abort_on_priority_when_disabled,
        )


def longest_token_chars(tokenizer: Any) -> int | None:
    """Characters of the vocabulary's longest token (special tokens included): a prompt of c characters
    has at least c / this many tokens. None when the tokenizer has no vocabulary to look at."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    try:
        vocab = get_vocab()
    except Exception:  # noqa: BLE001 - a bound we cannot compute is no bound
        return None
    return max((len(t) for t in vocab), default=0) or None


# --------------------------------------------------------------------------- primitives
def check_int(value: Any, field: str, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """``value`` is an int (not a bool) in [lo, hi]; returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{field} must be in [{lo}, {hi}], got {_short(value)}")
    return value


def check_str(value: Any, field: str, max_chars: int | None = None) -> str:
    """``value`` is a str that UTF-8 can encode (no lone surrogates), at most ``max_chars`` long."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"{field} is {len(value)} characters long, over the limit of {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field} is not valid Unicode (a lone surrogate at character {e.start})") from None
    return value


def check_token_ids(ids: Iterable[Any], field: str, vocab_size: int | None) -> None:
    """Every id is an int in [0, vocab_size) (in int64 when the vocabulary is unknown)."""
    hi = INT64_MAX if vocab_size is None else vocab_size - 1
    ids = list(ids)
    if not ids:
        return
    if not all(type(t) is int for t in ids):  # bool and other int subclasses are not token ids
        bad = next(t for t in ids if type(t) is not int)
        raise ValueError(f"{field} must hold integer token ids, got {type(bad).__name__}")
    lo_v, hi_v = min(ids), max(ids)
    if lo_v < 0 or hi_v > hi:
        bad = lo_v if lo_v < 0 else hi_v
        raise ValueError(f"{field}: token id {_short(bad)} is out of the vocabulary [0, {hi + 1})")


def check_json_strings(value: Any, field: str = "") -> None:
    """Every string (and key) in a decoded JSON document is encodable: JSON's ``"\\ud800"`` escapes decode
    to lone surrogates that no tokenizer or encoder accepts; and it nests at most ``MAX_JSON_DEPTH``
    levels. Iterative (no recursion limit to hit)."""
    stack = [(value, field, 0)]
    while stack:
        v, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{path or 'body'}: nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, str):
            check_str(v, path or "body")
        elif isinstance(v, dict):
            for k, x in v.items():
                key = f"{path}.{k}" if path else str(k)
                if isinstance(k, str):
                    check_str(k, f"{path or 'body'} key")
                stack.append((x, key, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def check_json_text_depth(text: str, field: str) -> None:
    """A JSON document given as text (``json_schema``) nests at most ``MAX_JSON_DEPTH`` levels: checked by
    scanning brackets outside strings, before any parser recurses into it."""
    depth = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"{field}: nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# --------------------------------------------------------------------------- before normalize
def check_counts(num_prompts: int, ns: list[int], limits: RequestLimits, field: str = "text") -> None:
    """Prompts per request, ``n`` of each, and the sequences they expand to (prompts × n)."""
    if num_prompts > limits.max_prompts_per_request:
        raise ValueError(f"{field}: {num_prompts} prompts in one request, over the limit of "
                         f"{limits.max_prompts_per_request} (--max-prompts-per-request)")
    for n in ns:
        if n > limits.max_n:
            raise ValueError(f"n: {n} is over the limit of {limits.max_n} (--max-n)")
    total = sum(max(n, 1) for n in ns)
    if total > limits.max_sequences_per_request:
        raise ValueError(f"n: the request expands to {total} sequences (prompts × n), over the limit of "
                         f"{limits.max_sequences_per_request} (--max-prompts-per-request)")


def _n_of(sp: Any) -> Any:
    if isinstance(sp, dict):
        return sp.get("n", 1)
    return getattr(sp, "n", 1) if sp is not None else 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _one_or_list(value: Any, field: str, ok: Any, what: str, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    items = value if isinstance(value, list) else [value]
    for x in items:
        if not ((x is None and allow_none) or ok(x)):
            raise ValueError(f"{field} must be {what} (or a list of them for a batch), got {type(x).__name__}")


def check_types(obj: "GenerateReqInput") -> None:
    """The raw fields' shapes (a client's ``{"top_logprobs_num": [[]]}`` is a ValueError, not a TypeError)."""
    from radixlm.runtime.sampling_params import SamplingParams

    if obj.text is not None and not isinstance(obj.text, (str, list)):
        raise ValueError(f"text must be a string or a list of strings, got {type(obj.text).__name__}")
    if obj.text is not None:
        _one_or_list(obj.text, "text", lambda x: isinstance(x, str), "a string", allow_none=False)
    ids = obj.input_ids
    if ids is not None:
        rows = ids if isinstance(ids, list) and ids and isinstance(ids[0], list) else [ids]
        if not all(isinstance(row, list) and all(_is_int(t) for t in row) for row in rows):
            raise ValueError("input_ids must be a list of ints or a list of lists of ints")
    if not obj.is_batch:  # one prompt takes one value per field
        for name in ("sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num"):
            if isinstance(getattr(obj, name), list):
                raise ValueError(f"{name}: a single prompt takes a single value, not a list")
    _one_or_list(obj.sampling_params, "sampling_params", lambda x: isinstance(x, (dict, SamplingParams)), "an object")
    _one_or_list(obj.rid, "rid", lambda x: isinstance(x, str), "a string")
    _one_or_list(obj.return_logprob, "return_logprob", lambda x: isinstance(x, bool), "a boolean", allow_none=False)
    _one_or_list(obj.logprob_start_len, "logprob_start_len", _is_int, "an integer")
    _one_or_list(obj.top_logprobs_num, "top_logprobs_num", _is_int, "an integer")
    tids = obj.token_ids_logprob
    if tids is not None:
        rows = [tids] if _is_int(tids) else [x if isinstance(x, list) else [x] for x in tids] if isinstance(tids, list) else None
        if rows is None or not all(_is_int(t) for row in rows for t in row):
            raise ValueError("token_ids_logprob must be a list of integer token ids (or one list per prompt)")
        if len(rows) > MAX_LIST_ITEMS or any(len(row) > MAX_LIST_ITEMS for row in rows):
            raise ValueError(f"token_ids_logprob: over the limit of {MAX_LIST_ITEMS} entries")
    for name in ("return_text_in_logprobs", "stream"):
        if not isinstance(getattr(obj, name), bool):
            raise ValueError(f"{name} must be a boolean, got {type(getattr(obj, name)).__name__}")


def check_admission(obj: "GenerateReqInput", limits: RequestLimits) -> None:
    """Shapes, counts and strings of a raw request, before tokenization and ``n`` expansion."""
    check_types(obj)
    if isinstance(obj.text, list):
        num = len(obj.text)
        field = "text"
    elif obj.input_ids is not None and isinstance(obj.input_ids, list) and obj.input_ids and isinstance(obj.input_ids[0], list):
        num = len(obj.input_ids)
        field = "input_ids"
    else:
        num, field = 1, "text" if obj.text is not None else "input_ids"
    check_counts(num, [], limits, field)  # first: the checks below are linear in the prompt count
    texts = [obj.text] if isinstance(obj.text, str) else obj.text if isinstance(obj.text, list) else []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            continue
        name = "text" if isinstance(obj.text, str) else f"text[{i}]"
        # Twice the longest token per token of the limit: a safety factor for normalizers.
        if limits.max_prompt_chars is not None and len(t) > limits.max_prompt_chars:
            raise ValueError(f"{name}: {len(t)} characters cannot fit in {limits.max_prompt_tokens} prompt tokens "
                             "(--max-prompt-tokens / the context length)")
        check_str(t, name)
    sps = obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params] * num
    for sp in (obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params]):
        for name in ("json_schema", "structural_tag"):
            value = sp.get(name) if isinstance(sp, dict) else getattr(sp, name, None)
            if isinstance(value, str):
                check_json_text_depth(value, name)
            elif isinstance(value, (dict, list)):
                check_json_strings(value, name)
    ns = []
    for sp in sps[:num]:
        n = _n_of(sp)
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"n must be an integer, got {type(n).__name__}")
        ns.append(n)
    ns += [1] * (num - len(ns))  # a shorter list is normalize's error; count the rest as n=1
    check_counts(num, ns, limits, field)
    for name in ("rid", "cache_salt", "extra_key"):
        value = getattr(obj, name, None)
        for r in value if isinstance(value, list) else [value]:
            if isinstance(r, str):
                check_str(r, name, MAX_RID_CHARS)


# --------------------------------------------------------------------------- after normalize
def check_requests(reqs: list["TokenizedGenerateReq"], limits: RequestLimits) -> None:
    """Every normalized sequence of one request (see ``check_request``)."""
    if len(reqs) > limits.max_sequences_per_request:
        raise ValueError(f"n: the request expands to {len(reqs)} sequences, over the limit of "
                         f"{limits.max_sequences_per_request}")
    for r in reqs:
        check_request(r, limits)


def check_request(r: "TokenizedGenerateReq", limits: RequestLimits) -> None:
    """One sequence: ids, lengths, logprob options and sampling parameters against the limits."""
    vocab = limits.vocab_size
    check_str(r.rid, "rid", MAX_RID_CHARS)
    if not r.input_ids:
        raise ValueError("input_ids: the prompt is empty")
    n_in = len(r.input_ids)
    if limits.max_prompt_tokens is not None and n_in > limits.max_prompt_tokens:
        raise ValueError(f"input_ids: the prompt has {n_in} tokens, over the limit of {limits.max_prompt_tokens} "
                         "(--max-prompt-tokens / the context length)")
    check_token_ids(r.input_ids, "input_ids", vocab)
    check_int(r.logprob.logprob_start_len, "logprob_start_len", -1, n_in - 1)
    top_hi = MAX_TOP_LOGPROBS if vocab is None else min(MAX_TOP_LOGPROBS, vocab)
    check_int(r.logprob.top_logprobs_num, "top_logprobs_num", 0, top_hi)
    if r.logprob.token_ids_logprob is not None:
        if len(r.logprob.token_ids_logprob) > MAX_LIST_ITEMS:
            raise ValueError(f"token_ids_logprob: {len(r.logprob.token_ids_logprob)} ids, over the limit of "
                             f"{MAX_LIST_ITEMS}")
        check_token_ids(r.logprob.token_ids_logprob, "token_ids_logprob", vocab)
    if r.priority is not None:
        check_int(r.priority, "priority")
        if not limits.priority_allowed:
            raise ValueError("priority: priority scheduling is disabled on this server (--enable-priority-scheduling); "
                             "send the request without a priority")
    check_sampling_params(r.sampling_params, limits)


def check_sampling_params(sp: Any, limits: RequestLimits) -> None:
    """SamplingParams: bounds that need the vocabulary or a size limit, then its own ``verify``."""
    vocab = limits.vocab_size
    check_int(sp.max_new_tokens, "max_new_tokens", 0)
    check_int(sp.min_new_tokens, "min_new_tokens", 0)
    if sp.top_k not in (-1, 0):
        check_int(sp.top_k, "top_k", 1, INT64_MAX if vocab is None else vocab)
    check_int(sp.n, "n", 1, limits.max_n)
    if sp.seed is not None:
        check_int(sp.seed, "seed")
    for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        v = getattr(sp, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {_short(v)}")
    if sp.stop is not None:
        if len(sp.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: {len(sp.stop)} stop strings, over the limit of {MAX_STOP_STRINGS}")
        for i, s in enumerate(sp.stop):
            check_str(s, f"stop[{i}]", MAX_STOP_CHARS)
    if sp.stop_token_ids is not None:
        if len(sp.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids: {len(sp.stop_token_ids)} ids, over the limit of {MAX_STOP_TOKEN_IDS}")
        check_token_ids(sp.stop_token_ids, "stop_token_ids", vocab)
    if sp.logit_bias:
        if len(sp.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias: {len(sp.logit_bias)} entries, over the limit of {MAX_LOGIT_BIAS_ENTRIES}")
        check_token_ids(sp.logit_bias.keys(), "logit_bias", vocab)
        for tok, bias in sp.logit_bias.items():
            if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
                raise ValueError(f"logit_bias: the bias of token {tok} must be a finite number")
    _check_all_fields(sp)
    sp.verify(vocab)


def _check_all_fields(sp: Any) -> None:
    """Whatever fields SamplingParams has (grammar strings included): strings encodable and bounded,
    integers within int64, lists and dicts bounded, so the msgpack encoder can never fail on them."""
    for name in sp.__struct_fields__:
        v = getattr(sp, name)
        if isinstance(v, str):
            check_str(v, name, MAX_GRAMMAR_CHARS)
        elif isinstance(v, int) and not isinstance(v, bool):
            check_int(v, name)
        elif isinstance(v, (list, tuple, dict)):
            if len(v) > MAX_LIST_ITEMS:
                raise ValueError(f"{name}: {len(v)} entries, over the limit of {MAX_LIST_ITEMS}")
            for i, x in enumerate(v):
                if isinstance(x, str):
                    check_str(x, f"{name}[{i}]", MAX_GRAMMAR_CHARS)
                elif isinstance(x, int) and not isinstance(x, bool):
                    check_int(x, f"{name}[{i}]")
