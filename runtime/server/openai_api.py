"""OpenAI-compatible serving: /v1/completions and /v1/chat/completions on top of the TokenizerManager.

Each OpenAI request becomes one ``GenerateReqInput`` (prompts tokenized here, so the prompt length is
known for the context check; ``n`` expanded by ``normalize`` into sequences ``prompt_i × n + j``),
and the SGLang-shaped results come back as OpenAI bodies or SSE chunks. Nothing here samples or
decodes: sampling fields map onto ``SamplingParams`` names, text comes from the detokenizer.

Length: over 400 lines because it holds both directions of the OpenAI mapping (requests →
``GenerateReqInput``, results → bodies and SSE streams); they are due to split into two modules once
the OpenAI work in flight on this file lands (noted by the structure work, issue 11).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from radixlm.runtime.constrained.json_schema import schema_to_regex
from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.server.openai_extras import EXTRA_FIELDS, sglang_fields
from radixlm.runtime.parsers.reasoning import ReasoningParser
from radixlm.runtime.server.openai_fields import (
    NotSupportedError,
    check_fields,
    constrained_sampling_fields,
    logit_bias_ids,
    vllm_guided_fields,
)
from radixlm.runtime.server.openai_logprobs import CompletionLogprobs, EchoPrompt, added_special_span, chat_logprobs
from radixlm.runtime.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
)
from radixlm.runtime.server.openai_tools import (
    ChatConfig,
    ChoiceStream,
    ToolPlan,
    chat_finish_reason,
    chat_message,
    function_specs,
    parse_choice,
    plan_tools,
    template_messages,
)
from radixlm.runtime.server.request_errors import RequestError
from radixlm.runtime.server.request_handle import GenEvent


class ModelNotFoundError(RequestError):
    """The request names a model this server does not serve: 404 ``model_not_found``, as OpenAI and vLLM."""

    status = 404
    code = "model_not_found"


# SGLang's clients send "default"; SGLang-habit clients send the --model-path they launched with.
DEFAULT_MODEL_ALIAS = "default"


def served_model_names(model_id: str, model_path: str) -> tuple[str, ...]:
    """Every name the OpenAI routes answer to: the served id first (the one /v1/models lists)."""
    return tuple(dict.fromkeys((model_id, DEFAULT_MODEL_ALIAS, model_path)))


def check_model(requested: str | None, names: tuple[str, ...]) -> None:
    """Raise ``ModelNotFoundError`` unless ``requested`` is one of ``names`` (omitted: the served model)."""
    if requested is not None and requested not in names:
        raise ModelNotFoundError(f"The model `{requested}` does not exist.", param="model")


# --------------------------------------------------------------------------- requests → GenerateReqInput
def _sampling_params(req: CompletionRequest | ChatCompletionRequest, max_new_tokens: int) -> dict[str, Any]:
    sp: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": req.min_tokens,
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "seed": req.seed,
        "skip_special_tokens": req.skip_special_tokens,
        "spaces_between_special_tokens": req.spaces_between_special_tokens,
        "no_stop_trim": req.no_stop_trim,
        "logit_bias": logit_bias_ids(req.logit_bias),
    }
    sp.update(constrained_sampling_fields(req.response_format, req.regex, vllm_guided_fields(req.model_extra or {}),
                                          req.structural_tag))
    try:
        extras = sglang_fields({f: getattr(req, f) for f in EXTRA_FIELDS})
    except ValueError as e:
        raise RequestError(str(e), param=str(e).split(":", 1)[0]) from None
    sp["no_stop_trim"] = bool(sp["no_stop_trim"] or extras.pop("no_stop_trim", False))
    if "ebnf" in extras and any(sp.get(k) is not None for k in ("regex", "json_schema", "structural_tag")):
        raise RequestError("ebnf: only one grammar per request (regex, response_format or a guided field "
                           "is also given)", param="ebnf")
    sp.update(extras)
    return {k: v for k, v in sp.items() if v is not None}


def _max_tokens(requested: int | None, prompt_lens: list[int], context_len: int, param: str,
                cap: int | None = None) -> int:
    """OpenAI semantics: an explicit budget must fit the context (400 otherwise); none means 'the rest',
    bounded by ``cap`` (--max-tokens-default-cap) so an omitted max_tokens cannot ask for the whole context
    for every prompt × n."""
    if requested is None:
        rest = context_len - max(prompt_lens)
        return max(min(rest, cap) if cap is not None else rest, 1)
    if requested < 0:
        raise RequestError(f"{param} must be >= 0, got {requested}", param=param)
    longest = max(prompt_lens)
    if longest >= context_len or requested + longest > context_len:
        raise RequestError(
            f"{param}: this model's maximum context length is {context_len} tokens. However, you requested "
            f"{requested + longest} tokens ({longest} in the prompt, {requested} in the completion). "
            f"Please reduce the length of the prompt or the completion.",
            param=param,
        )
    return requested


@dataclass
class Prepared:
    """A converted OpenAI request: what to submit, and what the response builder needs."""

    obj: GenerateReqInput
    prompts: list[list[int]]
    n: int
    model: str
    created: int
    id: str
    plan: ToolPlan = ToolPlan("none")  # chat: what the request asks of tools
    reasoning: ReasoningParser | None = None  # chat: split reasoning_content off (--reasoning-parser)
    echo: list[EchoPrompt] | None = None  # completions with echo: per prompt, what is echoed

    def completion_logprobs(self, req: CompletionRequest, tokenizer: Any, index: int) -> CompletionLogprobs:
        """The logprobs builder of choice ``index`` (sequence ``prompt × n + j``)."""
        echo = self.echo[index // self.n] if self.echo is not None else None
        return CompletionLogprobs(tokenizer, echo, bool(req.logprobs), req.skip_special_tokens,
                                  req.spaces_between_special_tokens)


def prepare_completion(req: CompletionRequest, tokenizer: Any, model_info: dict, model: str,
                       max_tokens_cap: int | None = None) -> Prepared:
    check_fields(req)
    if req.suffix:
        raise NotSupportedError("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise NotSupportedError("best_of != n is not supported", param="best_of")
    p = req.prompt
    texts: list[str] | None = None
    if isinstance(p, str) or isinstance(p[0], str):
        texts = [p] if isinstance(p, str) else list(p)
        prompts = [tokenizer(t, add_special_tokens=req.add_special_tokens).input_ids for t in texts]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    if any(len(x) == 0 for x in prompts):
        raise RequestError("prompt must not be empty", param="prompt")
    echo = None
    if req.echo:  # tokens the server added to a string prompt are echoed neither in text nor in logprobs
        echo = [EchoPrompt(ids, added_special_span(tokenizer, texts[i], ids) if texts else (0, len(ids)))
                for i, ids in enumerate(prompts)]
    ctx = int(model_info.get("context_length") or 1 << 30)
    max_new = _max_tokens(req.max_tokens, [len(x) for x in prompts], ctx, "max_tokens", max_tokens_cap)
    want_lp = req.logprobs is not None
    obj = GenerateReqInput(
        input_ids=prompts if len(prompts) > 1 else prompts[0],
        sampling_params=_sampling_params(req, max_new),
        rid=req.rid,
        return_logprob=want_lp,
        logprob_start_len=0 if (want_lp and req.echo) else None,
        top_logprobs_num=req.logprobs if want_lp else None,
        return_text_in_logprobs=want_lp,
        stream=req.stream,
        cache_salt=req.cache_salt,
        extra_key=req.extra_key,
        priority=req.priority,
    )
    return Prepared(obj, prompts, req.n, model, int(time.time()), f"cmpl-{uuid.uuid4().hex}", echo=echo)


def render_chat(req: ChatCompletionRequest | TokenizeChatRequest, tools: list[dict] | None, tokenizer: Any,
                cfg: ChatConfig) -> list[int]:
    """The prompt ids of a chat request: its messages (tool calls and results included) and ``tools``
    through the model's chat template, as /v1/chat/completions and /tokenize both see it."""
    messages = template_messages(req.messages)
    template = cfg.template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise RequestError("this model has no chat template; start the server with --chat-template", param="messages")
    kwargs = dict(req.chat_template_kwargs or {})
    if tools is not None:
        kwargs["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            **kwargs,
        )
    except Exception as e:  # noqa: BLE001 - a template error is the request's fault (roles, kwargs)
        raise RequestError(f"messages: the chat template failed: {e}", param="messages") from None
    # The template writes BOS itself; add_special_tokens (vLLM's, default false for chat) adds another.
    return tokenizer(text, add_special_tokens=req.add_special_tokens).input_ids


def tokenize(req: TokenizeRequest | TokenizeChatRequest, tokenizer: Any, cfg: ChatConfig, model_info: dict) -> dict:
    """vLLM's ``/tokenize``: a prompt, or chat messages rendered as /v1/chat/completions renders them."""
    if isinstance(req, TokenizeChatRequest):
        tools = ToolPlan("none", function_specs([t.function for t in req.tools])).template_tools() if req.tools else None
        ids = render_chat(req, tools, tokenizer, cfg)
    else:
        ids = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
    out: dict[str, Any] = {"count": len(ids), "max_model_len": model_info.get("context_length"), "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return out


def detokenize(req: DetokenizeRequest, tokenizer: Any, vocab_size: int) -> dict:
    """vLLM's ``/detokenize``: token ids → text (special tokens kept)."""
    bad = [t for t in req.tokens if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"tokens: ids out of the vocabulary (size {vocab_size}): {bad[:5]}", param="tokens")
    return {"prompt": tokenizer.decode(req.tokens)}


def _answer_after_reasoning(sp: dict[str, Any], parser: ReasoningParser, whitespace: str | None) -> None:
    """A reasoning model writes its block first: constrain the answer after it, or a DeepSeek-R1 answer
    (its prompt opens the block) lands inside the reasoning and the content comes back empty."""
    if "json_schema" in sp:  # a JSON answer never begins with the start marker: the block can be optional
        try:
            body, _ = schema_to_regex(sp.pop("json_schema"), whitespace)
        except ValueError as e:
            raise RequestError(f"response_format: {e}", param="response_format") from None
        sp["regex"] = parser.wrap_grammar(body, prose_first=False)
    elif parser.starts_inside:  # a user regex may itself begin with "<think>": wrap only where the block is certain
        sp["regex"] = parser.wrap_grammar(sp["regex"], prose_first=False)


def prepare_chat(
    req: ChatCompletionRequest, tokenizer: Any, cfg: ChatConfig, model_info: dict, model: str,
    max_tokens_cap: int | None = None,
) -> Prepared:
    check_fields(req)
    plan = plan_tools(req, cfg)
    ids = render_chat(req, plan.template_tools(), tokenizer, cfg)
    ctx = int(model_info.get("context_length") or 1 << 30)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = _max_tokens(requested, [len(ids)], ctx, param, max_tokens_cap)
    want_lp = bool(req.logprobs)
    if req.top_logprobs and not want_lp:
        raise RequestError("top_logprobs requires logprobs=true", param="top_logprobs")
    sp = _sampling_params(req, max_new)
    grammar = plan.regex(cfg.json_whitespace)
    if grammar is not None and cfg.reasoning_parser is not None:  # reason first, then call (calls are constrained)
        grammar = cfg.reasoning_parser.wrap_grammar(grammar, prose_first=plan.mode == "auto")
    if grammar is not None:
        if any(k in sp for k in ("regex", "json_schema", "ebnf", "structural_tag")):
            raise RequestError("tool_choice: tool calls and response_format/regex cannot constrain one output "
                               "together; use tool_choice='none'", param="tool_choice")
        sp["regex"] = grammar
        if getattr(plan.parser, "keeps_special_tokens", False) and "skip_special_tokens" not in req.model_fields_set:
            sp["skip_special_tokens"] = False  # the family's marker is a special token on real tokenizers
    elif cfg.reasoning_parser is not None and ("regex" in sp or "json_schema" in sp):
        _answer_after_reasoning(sp, cfg.reasoning_parser, cfg.json_whitespace)
    obj = GenerateReqInput(
        input_ids=ids,
        sampling_params=sp,
        rid=req.rid,
        return_logprob=want_lp,
        top_logprobs_num=(req.top_logprobs or 0) if want_lp else None,
        return_text_in_logprobs=want_lp,
        stream=req.stream,
        cache_salt=req.cache_salt,
        extra_key=req.extra_key,
        priority=req.priority,
    )
    reasoning = cfg.reasoning_parser if req.separate_reasoning else None
    return Prepared(obj, [ids], req.n, model, int(time.time()), f"chatcmpl-{uuid.uuid4().hex}", plan, reasoning)


# --------------------------------------------------------------------------- results → OpenAI bodies
def finish_reason(meta: dict) -> str | None:
    fr = meta.get("finish_reason")
    if not fr:
        return None
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(fr.get("type"), fr.get("type"))


def _matched_stop(meta: dict) -> Any:
    fr = meta.get("finish_reason") or {}
    return fr.get("matched")


def usage(prep: Prepared, metas: list[dict]) -> dict:
    # The prompt counts once per prompt, not once per sample (OpenAI's accounting for n > 1).
    prompt = sum(m.get("prompt_tokens", len(prep.prompts[i // prep.n])) for i, m in enumerate(metas) if i % prep.n == 0)
    completion = sum(m.get("completion_tokens", 0) for m in metas)
    cached = sum(m.get("cached_tokens", 0) for i, m in enumerate(metas) if i % prep.n == 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def completion_response(prep: Prepared, req: CompletionRequest, results: list[dict], tokenizer: Any) -> dict:
    choices = []
    for i, r in enumerate(results):
        meta = r["meta_info"]
        lp = prep.completion_logprobs(req, tokenizer, i)
        choice = {
            "index": i,
            "text": lp.prompt_text + r["text"],
            "logprobs": lp.add(meta, finished=True) if req.logprobs is not None else None,
            "finish_reason": finish_reason(meta),
            "matched_stop": _matched_stop(meta),
        }
        choices.append(choice)
    return {
        "id": prep.id,
        "object": "text_completion",
        "created": prep.created,
        "model": prep.model,
        "choices": choices,
        "usage": usage(prep, [r["meta_info"] for r in results]),
    }


def chat_response(prep: Prepared, req: ChatCompletionRequest, results: list[dict]) -> dict:
    choices = []
    for i, r in enumerate(results):
        meta = r["meta_info"]
        parsed = parse_choice(r["text"], prep.plan, prep.reasoning)
        choices.append(
            {
                "index": i,
                "message": chat_message(parsed, prep.plan),
                "logprobs": chat_logprobs(meta) if req.logprobs else None,
                "finish_reason": chat_finish_reason(finish_reason(meta), len(parsed.calls), prep.plan),
                "matched_stop": _matched_stop(meta),
            }
        )
    return {
        "id": prep.id,
        "object": "chat.completion",
        "created": prep.created,
        "model": prep.model,
        "choices": choices,
        "usage": usage(prep, [r["meta_info"] for r in results]),
    }


# --------------------------------------------------------------------------- streaming
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_completion(
    prep: Prepared, req: CompletionRequest, events: AsyncIterator[GenEvent], tokenizer: Any
) -> AsyncIterator[str]:
    include_usage, continuous = _usage_options(req)
    num = len(prep.prompts) * prep.n
    metas: list[dict] = [{} for _ in range(num)]
    echoed = [False] * num
    builders = [prep.completion_logprobs(req, tokenizer, i) for i in range(num)]
    base = {"id": prep.id, "object": "text_completion", "created": prep.created, "model": prep.model}
    async for ev in events:
        meta = ev.data.get("meta_info") or {}
        _merge_meta(metas[ev.index], meta)
        text = ev.data.get("text", "")
        if not echoed[ev.index]:
            echoed[ev.index] = True
            text = builders[ev.index].prompt_text + text
        lp = builders[ev.index].add(meta, ev.finished) if req.logprobs is not None else None
        if not text and not ev.finished and not (lp and lp["tokens"]):
            continue
        choice = {"index": ev.index, "text": text, "logprobs": lp,
                  "finish_reason": finish_reason(meta) if ev.finished else None}
        if ev.finished:
            choice["matched_stop"] = _matched_stop(meta)
        chunk = dict(base, choices=[choice])
        if include_usage:
            chunk["usage"] = usage(prep, metas) if continuous else None
        yield _sse(chunk)
    if include_usage:
        yield _sse(dict(base, choices=[], usage=usage(prep, metas)))
    yield "data: [DONE]\n\n"


async def stream_chat(prep: Prepared, req: ChatCompletionRequest, events: AsyncIterator[GenEvent]) -> AsyncIterator[str]:
    include_usage, continuous = _usage_options(req)
    metas: list[dict] = [{} for _ in range(prep.n)]
    base = {"id": prep.id, "object": "chat.completion.chunk", "created": prep.created, "model": prep.model}

    def extra() -> dict:
        return {"usage": usage(prep, metas) if continuous else None} if include_usage else {}

    for i in range(prep.n):  # OpenAI opens every choice with the role
        yield _sse(dict(base, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra()))
    parsers = [ChoiceStream(prep.plan, prep.reasoning, req.stream_reasoning) for _ in range(prep.n)]
    async for ev in events:
        meta = ev.data.get("meta_info") or {}
        _merge_meta(metas[ev.index], meta)
        delta = parsers[ev.index].feed(ev.data.get("text", ""), ev.finished)
        lp = chat_logprobs(meta) if req.logprobs else None
        if not delta and not ev.finished and not (lp and lp["content"]):
            continue
        choice = {"index": ev.index, "delta": delta, "logprobs": lp,
                  "finish_reason": parsers[ev.index].finish_reason(finish_reason(meta)) if ev.finished else None}
        if ev.finished:
            choice["matched_stop"] = _matched_stop(meta)
        yield _sse(dict(base, choices=[choice], **extra()))
    if include_usage:
        yield _sse(dict(base, choices=[], usage=usage(prep, metas)))
    yield "data: [DONE]\n\n"


def _usage_options(req: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool]:
    """(usage in a final chunk, usage so far in every chunk too): vLLM's stream_options."""
    opts = req.stream_options
    return bool(opts and opts.include_usage), bool(opts and opts.include_usage and opts.continuous_usage_stats)


def _merge_meta(acc: dict, delta: dict) -> None:
    for k, v in delta.items():
        if not k.endswith("_logprobs"):
            acc[k] = v
