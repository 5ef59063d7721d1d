"""The public API of the language (``import radixlm as sgl``), with SGLang's names and signatures."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

from radixlm.choices import ChoicesSamplingMethod, token_length_normalized
from radixlm.global_config import global_config
from radixlm.ir import (
    LOGPROB_FIELDS,
    SglExpr,
    SglExprList,
    SglFunction,
    SglGen,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglSeparateReasoning,
    _as_expr,
    check_regex,
    normalize_dtype,
    validate_overrides,
)
from radixlm.runtime.protocol import LogprobOptions


def function(func: Optional[Callable] = None, num_api_spec_tokens: Optional[int] = None):
    """Decorator: ``@function def prog(s, ...)`` (also ``@function()``)."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)


def Runtime(*args: Any, **kwargs: Any):
    """Launch a local radixlm server (HTTP + ZeroMQ) and return its handle (``.endpoint``, ``.url``)."""
    from radixlm.runtime.server.runtime_handle import Runtime as _Runtime

    return _Runtime(*args, **kwargs)


def set_default_backend(backend: Any) -> None:
    """Programs without ``backend=`` run on this. ``global_config.default_backend`` is the object given
    (a ``Runtime`` keeps its ``.endpoint``, as in SGLang); it is checked here, resolved when used."""
    from radixlm.backend import as_backend

    if backend is not None:
        as_backend(backend)  # a ValueError now, not at the first program
    global_config.default_backend = backend


def _backend(backend: Any) -> Any:
    from radixlm.backend import as_backend

    backend = backend if backend is not None else global_config.default_backend
    return as_backend(backend) if backend is not None else None


def flush_cache(backend: Any = None, empty_cache: bool = True) -> Any:
    b = _backend(backend)
    return False if b is None else b.flush_cache()


def get_server_info(backend: Any = None) -> Optional[dict]:
    b = _backend(backend)
    return None if b is None else b.get_server_info()


# --------------------------------------------------------------------------- generation
def gen(
    name: Optional[str] = None,
    max_tokens: Optional[int] = None,
    min_tokens: Optional[int] = None,
    *,
    choices: Optional[list[str]] = None,
    choices_method: Optional[ChoicesSamplingMethod] = None,
    dtype: Union[type, str, None] = None,
    regex: Optional[str] = None,
    json_schema: Any = None,
    return_logprob: Optional[bool] = None,
    logprob_start_len: Optional[int] = None,
    top_logprobs_num: Optional[int] = None,
    return_text_in_logprobs: Optional[bool] = None,
    stop_regex: Any = None,
    **sampling: Any,
) -> SglExpr:
    """Generate into variable ``name``.

    Sampling fields are those of ``radixlm.runtime.sampling_params.SamplingParams`` (stop, temperature,
    top_p, top_k, min_p, frequency_penalty, presence_penalty, repetition_penalty, stop_token_ids,
    ignore_eos, n, seed, ...), passed by keyword; ``max_tokens``/``min_tokens`` are SGLang's names for
    ``max_new_tokens``/``min_new_tokens``. Fields left unset take the run's defaults. ``choices``
    turns this into ``select``; ``dtype`` (int, float, str, bool) and ``regex``/``json_schema`` constrain
    the output. Invalid arguments raise ValueError here, not when the program runs.
    """
    if choices is not None:
        temperature = sampling.pop("temperature", None)
        if sampling:
            raise ValueError(f"gen with choices: sampling field(s) {sorted(sampling)} do not apply")
        return select(name, choices, 0.0 if temperature is None else temperature,
                      choices_method or token_length_normalized)
    if stop_regex is not None:
        raise ValueError("stop_regex: not supported by radixlm (use stop or regex)")
    for alias, field in (("max_tokens", "max_new_tokens"), ("min_tokens", "min_new_tokens")):
        if field in sampling and locals()[alias] is not None:
            raise ValueError(f"gen: give {alias} or {field}, not both")
    if max_tokens is not None:
        sampling["max_new_tokens"] = max_tokens
    if min_tokens is not None:
        sampling["min_new_tokens"] = min_tokens
    check_regex(regex)
    if regex is not None:
        sampling["regex"] = regex
    if json_schema is not None:
        sampling["json_schema"] = json_schema
    dtype_name = normalize_dtype(dtype)
    overrides = validate_overrides({k: v for k, v in sampling.items() if v is not None})
    logprob = {k: v for k, v in zip(LOGPROB_FIELDS, (return_logprob, logprob_start_len, top_logprobs_num,
                                                      return_text_in_logprobs)) if v is not None}
    LogprobOptions.from_dict(logprob)  # checked at the call, like the sampling fields
    if name is not None and not isinstance(name, str):
        raise ValueError(f"gen: name must be a string, got {type(name).__name__}")
    return SglGen(name, overrides, dtype_name, logprob)


def gen_int(name: Optional[str] = None, max_tokens: Optional[int] = None, **kwargs: Any) -> SglExpr:
    """``gen`` constrained to an integer."""
    return gen(name, max_tokens, dtype=int, **kwargs)


def gen_string(name: Optional[str] = None, max_tokens: Optional[int] = None, **kwargs: Any) -> SglExpr:
    """``gen`` constrained to a double-quoted string."""
    return gen(name, max_tokens, dtype=str, **kwargs)


def select(
    name: Optional[str] = None,
    choices: Optional[list[str]] = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
) -> SglExpr:
    """Append the most likely of ``choices`` (scored in one request sharing the prefix)."""
    if not choices:
        raise ValueError("select: choices must be a non-empty list of strings")
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select: every choice must be a non-empty string")
    if temperature is None or temperature > 1e-5:
        raise ValueError(f"select: only temperature 0 is supported, got {temperature}")
    if not isinstance(choices_method, ChoicesSamplingMethod):
        raise ValueError(
            "select: choices_method must be token_length_normalized, greedy_token_selection or "
            "unconditional_likelihood_normalized"
        )
    return SglSelect(name, list(choices), float(temperature), choices_method)


# --------------------------------------------------------------------------- roles
def separate_reasoning(expr: Any = None, model_type: Optional[str] = None) -> SglExprList:
    """``expr`` followed by splitting the reasoning off what it generated (SGLang's API): after
    ``s += separate_reasoning(gen("a"), model_type="deepseek-r1")``, ``s["a"]`` is the answer and
    ``s["a_reasoning_content"]`` the reasoning. ``model_type`` is a ``--reasoning-parser`` name."""
    from radixlm.runtime.parsers.reasoning import REASONING_PARSER_NAMES

    if model_type not in REASONING_PARSER_NAMES:
        raise ValueError(f"separate_reasoning: model_type must be one of {list(REASONING_PARSER_NAMES)}, "
                         f"got {model_type!r}")
    inner = _as_expr(expr) if expr is not None else None
    return SglExprList(([inner] if inner is not None else []) + [SglSeparateReasoning(model_type, inner)])


def _role(role: str, expr: Any = None) -> SglExprList:
    if expr is None:
        return SglExprList([SglRoleBegin(role), SglRoleEnd(role)])
    return SglExprList([SglRoleBegin(role), _as_expr(expr), SglRoleEnd(role)])


def system(expr: Any = None) -> SglExprList:
    return _role("system", expr)


def user(expr: Any = None) -> SglExprList:
    return _role("user", expr)


def assistant(expr: Any = None) -> SglExprList:
    return _role("assistant", expr)


def system_begin() -> SglRoleBegin:
    return SglRoleBegin("system")


def system_end() -> SglRoleEnd:
    return SglRoleEnd("system")


def user_begin() -> SglRoleBegin:
    return SglRoleBegin("user")


def user_end() -> SglRoleEnd:
    return SglRoleEnd("user")


def assistant_begin() -> SglRoleBegin:
    return SglRoleBegin("assistant")


def assistant_end() -> SglRoleEnd:
    return SglRoleEnd("assistant")
