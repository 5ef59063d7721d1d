"""Pydantic models of the OpenAI request bodies the server accepts (/v1/completions, /v1/chat/completions).

Only the request side is modelled: responses are plain dicts built in ``openai_api``. Fields nobody
defines are logged and ignored, as vLLM does, so a newer official client keeps working; OpenAI features
the server lacks are refused (``openai_api.check_fields``); a known field with a wrong type or value is a
400 that names it. SGLang/vLLM sampling extras (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, no_stop_trim, regex) ride along, as do SGLang's
reasoning switches (separate_reasoning, stream_reasoning).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

_FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class _Body(BaseModel):
    # Extra fields are kept (``model_extra``) so the routes can refuse the OpenAI features they lack and
    # log the rest (openai_api.check_fields); they are never used.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema", "regex", "structural_tag"]
    json_schema: Optional[dict[str, Any]] = None  # {"name", "schema", "strict"} as OpenAI sends it
    regex: Optional[str] = None
    # SGLang's structural_tag: {"structures": [{"begin", "schema", "end"}], "triggers": [...]} (legacy form)
    # or xgrammar's {"format": {...}}; the other keys travel in model_extra (openai_fields maps them)


class _SamplingExtras(_Body):
    """Fields shared by both endpoints; names as OpenAI (and vLLM for the extras) spell them."""

    model: Optional[str] = None
    n: int = Field(default=1, ge=1, le=128)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    seed: Optional[int] = None
    # Bookkeeping fields OpenAI defines that do not change the output: accepted, not used.
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None  # the radix cache shares prefixes without a key
    safety_identifier: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[ResponseFormat] = None
    # extras (vLLM / SGLang names)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: Optional[str] = None
    rid: Optional[str] = None
    # KV cache namespace (vLLM's cache_salt, SGLang's extra_key): prefixes are shared only within it
    cache_salt: Optional[StrictStr] = None
    extra_key: Optional[StrictStr] = None
    priority: Optional[int] = None  # SGLang's (--enable-priority-scheduling)
    # SGLang / vLLM extras that change the output (runtime/server/openai_extras.py maps them)
    stop_regex: Optional[Union[str, list[str]]] = None
    ebnf: Optional[str] = None
    structural_tag: Optional[Union[str, dict[str, Any]]] = None  # SGLang's sampling field, as on /generate
    sampling_seed: Optional[int] = None
    # (vLLM's guided_* / structured_outputs stay extras: openai_fields.vllm_guided_fields reads them)
    include_stop_str_in_output: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported_extras(cls, data: Any) -> Any:
        from radixlm.runtime.server.openai_extras import check_refused
        from radixlm.runtime.server.request_errors import RequestError

        try:
            check_refused(data)  # an extra that would change the output is refused, never ignored
        except ValueError as e:  # not pydantic's ValueError wrapping: a 400 that names the field
            raise RequestError(str(e), param=str(e).split(":", 1)[0]) from None
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v


class CompletionRequest(_SamplingExtras):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS before a string prompt
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and isinstance(v[0], list) and any(len(p) == 0 for p in v):
            raise ValueError("prompt must not contain an empty token list")
        return v


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class FunctionDefinition(_Body):
    """``tools[i].function`` (and a legacy ``functions[i]``)."""

    name: str = Field(pattern=_FUNCTION_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None  # arguments are always schema-constrained here, so strict is always honoured


class ToolDefinition(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Body):
    name: str = Field(pattern=_FUNCTION_NAME)


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(_Body):
    """A call as the history carries it: arguments are a JSON string (OpenAI) or an object (some clients)."""

    name: str
    arguments: Union[str, dict[str, Any]] = "{}"


class ToolCallItem(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallItem]] = None  # assistant turns
    tool_call_id: Optional[str] = None  # tool turns
    function_call: Optional[FunctionCall] = None  # legacy assistant turns
    reasoning_content: Optional[str] = None  # given to the template (Qwen3's reads it)

    @model_validator(mode="after")
    def _roles(self) -> "ChatMessage":
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError("tool_calls / function_call are only allowed on assistant messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.role == "function" and not self.name:
            raise ValueError("a function message needs name")
        return self


class ChatCompletionRequest(_SamplingExtras):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    store: Optional[bool] = None  # true is refused: there is no store of completions
    tools: Optional[list[ToolDefinition]] = Field(default=None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True
    functions: Optional[list[FunctionDefinition]] = Field(default=None, max_length=128)  # legacy
    function_call: Optional[Union[Literal["none", "auto"], FunctionName]] = None  # legacy
    # SGLang's reasoning switches (effective with --reasoning-parser)
    separate_reasoning: bool = True
    stream_reasoning: bool = True
    # vLLM extras for the template
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # vLLM's default for chat: the template already writes BOS
    continue_final_message: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _tools(self) -> "ChatCompletionRequest":
        if self.functions is not None and self.tools is not None:
            raise ValueError("functions (legacy) and tools are mutually exclusive")
        if self.function_call is not None and self.tool_choice is not None:
            raise ValueError("function_call (legacy) and tool_choice are mutually exclusive")
        return self


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize`` with a prompt."""

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Body):
    """vLLM's ``/tokenize`` with chat messages: the prompt /v1/chat/completions would run."""

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[ToolDefinition]] = Field(default=None, max_length=128)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: Optional[dict[str, Any]] = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int]
