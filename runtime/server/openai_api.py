"""OpenAI-compatible serving: /v1/completions and /v1/chat/completions on top of the TokenizerManager.

Each OpenAI request becomes one ``GenerateReqInput`` (prompts tokenized here, so the prompt length is
known for the context check; ``n`` expanded by ``normalize`` into sequences ``prompt_i × n + j``),
and the SGLang-shaped results come back as OpenAI bodies or SSE chunks. Nothing here samples or
decodes: sampling fields map onto ``SamplingParams`` names, text comes from the detokenizer.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from radixlm.runtime.constrained import JSON_OBJECT_SCHEMA
from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.server.openai_extras import EXTRA_FIELDS, grammar_fields
from radixlm.runtime.parsers.reasoning import ReasoningParser
from radixlm.runtime.server.openai_logprobs import CompletionLogprobs, EchoPrompt, added_special_span, chat_logprobs
from radixlm.runtime.server.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat
from radixlm.runtime.server.openai_tools import (
    ChatConfig,
    ChoiceStream,
    ToolPlan,
    chat_finish_reason,
    chat_message,
    parse_choice,
    plan_tools,
    template_messages,
)
from radixlm.runtime.server.tokenizer_manager import GenEvent, RequestError


class NotSupportedError(RequestError):
    """A recognised OpenAI feature this server does not implement (yet): 400."""


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


# --------------------------------------------------------------------------- constrained decoding
def constrained_sampling_fields(response_format: ResponseFormat | None, regex: str | None) -> dict[str, str]:
    """THE place where OpenAI's ``response_format`` and the extra ``regex`` field become SamplingParams
    fields (``regex`` / ``json_schema``); the patterns themselves are validated by the shared front end."""
    fields: dict[str, str] = {}
    if regex is not None:
        fields["regex"] = regex
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            fields["json_schema"] = JSON_OBJECT_SCHEMA
        elif response_format.type == "json_schema":
            spec = response_format.json_schema or {}
            schema = spec.get("schema", spec.get("schema_"))
            if schema is None:
                raise RequestError("response_format.json_schema.schema is required", param="response_format")
            fields["json_schema"] = json.dumps(schema)
        elif response_format.type == "regex":
            if not response_format.regex:
                raise RequestError("response_format.regex is required", param="response_format")
            fields["regex"] = response_format.regex
    if len(fields) > 1:
        raise RequestError("regex and response_format are mutually exclusive", param="regex")
    return fields


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
        "logit_bias": _logit_bias(req.logit_bias),
    }
    sp.update(constrained_sampling_fields(req.response_format, req.regex))
    try:
        extras = grammar_fields({f: getattr(req, f) for f in EXTRA_FIELDS})
    except ValueError as e:
        raise RequestError(str(e), param=str(e).split(":", 1)[0]) from None
    sp["no_stop_trim"] = bool(sp["no_stop_trim"] or extras.pop("no_stop_trim", False))
    clash = sorted(k for k in extras if sp.get(k) is not None)
    if clash:
        raise RequestError(f"{clash[0]}: given twice (regex/response_format and a guided_* or structured_outputs "
                           "extra); give one", param=clash[0])
    sp.update(extras)
    return {k: v for k, v in sp.items() if v is not None}


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings); the range check against the vocabulary is
    SamplingParams.verify's, at submit."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            out[int(k)] = float(v)
        except ValueError:
            raise RequestError(f"logit_bias: keys must be token ids, got {k!r}", param="logit_bias") from None
    return out


def _max_tokens(requested: int | None, prompt_lens: list[int], context_len: int, param: str) -> int:
    """OpenAI semantics: an explicit budget must fit the context (400 otherwise); none means 'the rest'."""
    if requested is None:
        return max(context_len - max(prompt_lens), 1)
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


def prepare_completion(req: CompletionRequest, tokenizer: Any, model_info: dict, model: str) -> Prepared:
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
    max_new = _max_tokens(req.max_tokens, [len(x) for x in prompts], ctx, "max_tokens")
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
    )
    return Prepared(obj, prompts, req.n, model, int(time.time()), f"cmpl-{uuid.uuid4().hex}", echo=echo)


def prepare_chat(
    req: ChatCompletionRequest, tokenizer: Any, cfg: ChatConfig, model_info: dict, model: str
) -> Prepared:
    plan = plan_tools(req, cfg)
    messages = template_messages(req.messages)
    template = cfg.template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise RequestError("this model has no chat template; start the server with --chat-template", param="messages")
    kwargs = dict(req.chat_template_kwargs or {})
    tools = plan.template_tools()
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
    ids = tokenizer(text, add_special_tokens=req.add_special_tokens).input_ids
    ctx = int(model_info.get("context_length") or 1 << 30)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_new = _max_tokens(requested, [len(ids)], ctx, param)
    want_lp = bool(req.logprobs)
    if req.top_logprobs and not want_lp:
        raise RequestError("top_logprobs requires logprobs=true", param="top_logprobs")
    sp = _sampling_params(req, max_new)
    grammar = plan.regex(cfg.json_whitespace)
    if grammar is not None:
        if "regex" in sp or "json_schema" in sp:
            raise RequestError("tool_choice: tool calls and response_format/regex cannot constrain one output "
                               "together; use tool_choice='none'", param="tool_choice")
        sp["regex"] = grammar
        if getattr(plan.parser, "keeps_special_tokens", False) and "skip_special_tokens" not in req.model_fields_set:
            sp["skip_special_tokens"] = False  # the family's marker is a special token on real tokenizers
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
    prompt = sum(m.get("prompt_tokens", 0) for i, m in enumerate(metas) if i % prep.n == 0)
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
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
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
            chunk["usage"] = None
        yield _sse(chunk)
    if include_usage:
        yield _sse(dict(base, choices=[], usage=usage(prep, metas)))
    yield "data: [DONE]\n\n"


async def stream_chat(prep: Prepared, req: ChatCompletionRequest, events: AsyncIterator[GenEvent]) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    metas: list[dict] = [{} for _ in range(prep.n)]
    base = {"id": prep.id, "object": "chat.completion.chunk", "created": prep.created, "model": prep.model}
    extra = {"usage": None} if include_usage else {}
    for i in range(prep.n):  # OpenAI opens every choice with the role
        yield _sse(dict(base, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra))
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
        yield _sse(dict(base, choices=[choice], **extra))
    if include_usage:
        yield _sse(dict(base, choices=[], usage=usage(prep, metas)))
    yield "data: [DONE]\n\n"


def _merge_meta(acc: dict, delta: dict) -> None:
    for k, v in delta.items():
        if not k.endswith("_logprobs"):
            acc[k] = v
