"""The program IR: the expressions a program appends to its state, and ``SglFunction``.

Sampling fields are never restated here: a ``gen`` keeps only the fields its caller set
(``overrides``), checked at the call by ``SamplingParams.from_dict``; the interpreter lays them over
the run's defaults (a full ``SamplingParams``) and validates the result again before sending it.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from radixlm.choices import ChoicesSamplingMethod
from radixlm.runtime.protocol import LogprobOptions
from radixlm.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixlm.interpreter import ProgramState

# dtype → (regex, extra stop strings). The trailing whitespace lets a number end on a stop string.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""
_DTYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "int": (REGEX_INT, (" ", "\n")),
    "float": (REGEX_FLOAT, (" ", "\n")),
    "str": (REGEX_STR, ()),
    "bool": (REGEX_BOOL, ()),
}
SAMPLING_FIELDS: frozenset[str] = frozenset(SamplingParams.__struct_fields__)
LOGPROB_FIELDS: tuple[str, ...] = LogprobOptions.FIELDS


def normalize_dtype(dtype: Any) -> Optional[str]:
    """``int``/``"int"``/``float``/``str``/``bool`` → its name; anything else → ValueError."""
    if dtype is None:
        return None
    name = dtype.__name__ if isinstance(dtype, type) else dtype
    if name == "string":
        name = "str"
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"dtype: unsupported {dtype!r}; use one of int, float, str, bool")
    return name


def dtype_regex(dtype: str) -> tuple[str, tuple[str, ...]]:
    return _DTYPES[dtype]


def check_regex(regex: Optional[str]) -> None:
    if regex is None:
        return
    if not isinstance(regex, str):
        raise ValueError(f"regex must be a string, got {type(regex).__name__}")
    try:
        re.compile(regex)
    except re.error as e:
        raise ValueError(f"regex does not compile: {e}") from None


def validate_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Check sampling overrides with ``SamplingParams`` and return them normalised (stop as a list...).

    Fields are checked against SamplingParams' defaults; only a ``min_new_tokens`` above the default
    ``max_new_tokens`` is let through here (the run may raise the maximum) and checked at execution.
    """
    unknown = sorted(k for k in overrides if k not in SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"sampling_params: unknown field(s) {unknown}")
    probe = dict(overrides)
    if "min_new_tokens" in probe and "max_new_tokens" not in probe and isinstance(probe["min_new_tokens"], int):
        probe["max_new_tokens"] = max(probe["min_new_tokens"], SamplingParams().max_new_tokens)
    sp = SamplingParams.from_dict(probe)
    return {k: getattr(sp, k) for k in overrides}


# --------------------------------------------------------------------------- resolved parameters
@dataclass
class SglSamplingParams:
    """What one generation call sends: a validated ``SamplingParams`` plus the request-level
    ``LogprobOptions``.

    Attribute access falls through to both (``sp.max_new_tokens``, ``sp.stop``, ``sp.return_logprob``
    ...), as SGLang's object of the same name allows.
    """

    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprob: LogprobOptions = field(default_factory=LogprobOptions)
    dtype: Optional[str] = None

    def __getattr__(self, name: str) -> Any:
        if name in SAMPLING_FIELDS:
            return getattr(self.sampling, name)
        if name in LOGPROB_FIELDS:
            return getattr(self.logprob, name)
        raise AttributeError(name)

    def to_srt_kwargs(self) -> dict[str, Any]:
        """The ``sampling_params`` of a native ``/generate`` request."""
        return {k: v for k, v in self.sampling.to_dict().items() if v is not None}

    def logprob_kwargs(self) -> dict[str, Any]:
        """The request-level logprob fields a ``/generate`` body must carry (those off their defaults)."""
        return self.logprob.to_dict()

    def to_openai_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``openai`` ``completions.create`` / ``chat.completions.create``.

        Standard fields are passed as such; the rest (top_k, min_p, regex, json_schema ...) travel in
        ``extra_body``, which OpenAI-compatible servers (radixlm, SGLang, vLLM) read.
        """
        sp = self.sampling
        default = SamplingParams()
        kwargs: dict[str, Any] = {
            "max_tokens": sp.max_new_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "frequency_penalty": sp.frequency_penalty,
            "presence_penalty": sp.presence_penalty,
        }
        if sp.stop:
            kwargs["stop"] = list(sp.stop)
        if sp.n != 1:
            kwargs["n"] = sp.n
        if sp.seed is not None:
            kwargs["seed"] = sp.seed
        extra: dict[str, Any] = {}
        for name in ("top_k", "min_p", "min_new_tokens", "repetition_penalty", "ignore_eos", "stop_token_ids",
                     "regex", "skip_special_tokens", "no_stop_trim"):
            value = getattr(sp, name)
            if value is not None and value != getattr(default, name):
                extra[name] = value
        if sp.json_schema is not None:
            import json

            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "schema", "schema": json.loads(sp.json_schema)},
            }
        if extra:
            kwargs["extra_body"] = extra
        return kwargs


# --------------------------------------------------------------------------- expressions
class SglExpr:
    """Base of everything ``s += ...`` accepts. ``a + b`` builds an ``SglExprList``."""

    def __add__(self, other: Any) -> "SglExprList":
        return _concat(self, _as_expr(other))

    def __radd__(self, other: Any) -> "SglExprList":
        return _concat(_as_expr(other), self)


def _as_expr(x: Any) -> SglExpr:
    if isinstance(x, SglExpr):
        return x
    if isinstance(x, str):
        return SglConstantText(x)
    raise ValueError(f"cannot append {type(x).__name__} to a program; use a string or an sgl expression")


def _concat(a: SglExpr, b: SglExpr) -> "SglExprList":
    left = a.expr_list if isinstance(a, SglExprList) else [a]
    right = b.expr_list if isinstance(b, SglExprList) else [b]
    return SglExprList(left + right)


class SglExprList(SglExpr):
    def __init__(self, expr_list: list[SglExpr]):
        self.expr_list = expr_list

    def __repr__(self) -> str:
        return f"ExprList({self.expr_list})"


def flatten(expr: SglExpr) -> list[SglExpr]:
    if isinstance(expr, SglExprList):
        return [y for x in expr.expr_list for y in flatten(x)]
    return [expr]


class SglConstantText(SglExpr):
    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return f"Constant({self.value!r})"


class SglGen(SglExpr):
    """Generate text into variable ``name``.

    ``overrides`` holds only the SamplingParams fields the call set (already validated); ``dtype``,
    the logprob options and ``regex``/``json_schema`` (kept in overrides) complete it.
    """

    def __init__(self, name: Optional[str], overrides: dict[str, Any], dtype: Optional[str] = None,
                 logprob: Optional[dict[str, Any]] = None):
        self.name = name
        self.overrides = overrides
        self.dtype = dtype
        self.logprob = logprob or {}  # the LogprobOptions fields the call set (already validated)

    def __repr__(self) -> str:
        return f"Gen({self.name!r})"


class SglSelect(SglExpr):
    def __init__(self, name: Optional[str], choices: list[str], temperature: float,
                 choices_method: ChoicesSamplingMethod):
        self.name = name
        self.choices = choices
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self) -> str:
        return f"Select({self.name!r}, choices={self.choices}, choices_method={self.choices_method})"


class SglSeparateReasoning(SglExpr):
    """After ``expr`` ran: split the reasoning off each variable it generated (SGLang's names): ``name``
    keeps the answer, ``name + "_reasoning_content"`` gets the reasoning, and the program text keeps
    only the answer."""

    def __init__(self, model_type: str, expr: Optional[SglExpr]):
        self.model_type = model_type
        self.expr = expr

    @property
    def targets(self) -> list[str]:
        """The variables ``expr`` generates (gen and select with a name)."""
        if self.expr is None:
            return []
        return [e.name for e in flatten(self.expr) if isinstance(e, (SglGen, SglSelect)) and e.name is not None]

    @staticmethod
    def reasoning_name(name: str) -> str:
        return f"{name}_reasoning_content"

    def __repr__(self) -> str:
        return f"SeparateReasoning({self.model_type!r}, {self.targets})"


class SglRoleBegin(SglExpr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return f"RoleBegin({self.role})"


class SglRoleEnd(SglExpr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self) -> str:
        return f"RoleEnd({self.role})"


class SglVarScopeBegin(SglExpr):
    def __init__(self, name: str):
        self.name = name


class SglVarScopeEnd(SglExpr):
    def __init__(self, name: str):
        self.name = name


class SglCommitLazy(SglExpr):
    """Send the text so far to the backend so its KV is computed and cached (before a fork)."""


class SglConcateAndAppend(SglExpr):
    """Append the text each forked state added after the fork (join mode ``concate_and_append``)."""

    def __init__(self, states: list["ProgramState"]):
        self.states = states


class SglRaise(SglExpr):
    """Fail the program with ``error`` once everything before it has run (a failed fork branch)."""

    def __init__(self, error: BaseException):
        self.error = error


class SglArgument(SglExpr):
    """A program argument while tracing: its value is unknown, so using it ends the constant prefix."""

    def __init__(self, name: str, value: Any = None):
        self.name = name
        self.value = value

    def __repr__(self) -> str:
        return f"Argument({self.name!r})"

    def __format__(self, spec: str) -> str:
        raise TypeError("a traced argument cannot be formatted into an f-string")

    def __str__(self) -> str:
        raise TypeError("a traced argument has no value")

    def __bool__(self) -> bool:
        raise TypeError("a traced argument has no truth value")


class SglVariable(SglExpr):
    """A variable read while tracing (its value comes from ``source`` at run time)."""

    def __init__(self, name: str, source: Optional[SglExpr] = None):
        self.name = name
        self.source = source

    def __repr__(self) -> str:
        return f"Variable({self.name!r})"


class SglFork(SglExpr):
    def __init__(self, number: int):
        self.number = number


class SglGetForkItem(SglExpr):
    def __init__(self, index: int):
        self.index = index


# --------------------------------------------------------------------------- functions
class SglFunction:
    """A program: ``@function def prog(s, ...)``. Run with ``.run``/``.run_batch``."""

    def __init__(self, func: Callable, num_api_spec_tokens: Optional[int] = None,
                 bind_arguments: Optional[dict[str, Any]] = None):
        params = list(inspect.signature(func).parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ValueError("a @function program must take the program state as its first argument")
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        self.arg_names = [p.name for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        self.arg_defaults = [p.default for p in params[1:] if p.default is not p.empty]
        self._accepts_var_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
        functools.update_wrapper(self, func)

    # ------------------------------------------------------------------ argument plumbing
    def bind(self, **kwargs: Any) -> "SglFunction":
        unknown = [k for k in kwargs if k not in self.arg_names]
        if unknown:
            raise ValueError(f"bind: {self.func.__name__} has no argument(s) {unknown}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Program arguments vs run-level sampling defaults: a name the program takes goes to it."""
        program, sampling = {}, {}
        for k, v in kwargs.items():
            if k in self.arg_names or k in self.bind_arguments or k not in SAMPLING_FIELDS:
                program[k] = v
            else:
                sampling[k] = v
        return program, sampling

    @staticmethod
    def _defaults(sampling: dict[str, Any], logprob: dict[str, Any]) -> SglSamplingParams:
        stop = sampling.get("stop")
        if stop is not None and not stop:
            sampling = {k: v for k, v in sampling.items() if k != "stop"}  # SGLang passes stop=[] / ()
        sids = sampling.get("stop_token_ids")
        if sids is not None and not sids:
            sampling = {k: v for k, v in sampling.items() if k != "stop_token_ids"}
        return SglSamplingParams(SamplingParams.from_dict(sampling), LogprobOptions.from_dict(logprob))

    def _batch_kwargs(self, batch_kwargs: Any) -> list[dict[str, Any]]:
        if not isinstance(batch_kwargs, (list, tuple)):
            raise ValueError("run_batch: batch_kwargs must be a list of dicts (or of argument tuples)")
        out = []
        required = len(self.arg_names) - len(self.arg_defaults)
        for i, item in enumerate(batch_kwargs):
            if isinstance(item, dict):
                out.append(dict(item))
            elif isinstance(item, (list, tuple)) and required <= len(item) <= len(self.arg_names):
                out.append(dict(zip(self.arg_names, item)))
            else:
                raise ValueError(f"run_batch: item {i} does not match the signature of {self.func.__name__}")
        return out

    # ------------------------------------------------------------------ execution
    def run(
        self,
        *args: Any,
        return_logprob: Optional[bool] = None,
        logprob_start_len: Optional[int] = None,
        top_logprobs_num: Optional[int] = None,
        return_text_in_logprobs: Optional[bool] = None,
        stream: bool = False,
        backend: Any = None,
        **kwargs: Any,
    ) -> "ProgramState":
        """Run once. Keyword arguments the program does not take and that name a SamplingParams field
        (max_new_tokens, temperature, stop, ...) become defaults for every ``gen`` in the program."""
        from radixlm.interpreter import run_program

        program_kwargs, sampling = self._split_kwargs(kwargs)
        defaults = self._defaults(sampling, dict(
            return_logprob=return_logprob, logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs))
        return run_program(self, _resolve_backend(backend), args, program_kwargs, defaults, stream=stream)

    def run_batch(
        self,
        batch_kwargs: Union[list[dict[str, Any]], list[tuple]],
        *,
        return_logprob: Optional[bool] = None,
        logprob_start_len: Optional[int] = None,
        top_logprobs_num: Optional[int] = None,
        return_text_in_logprobs: Optional[bool] = None,
        backend: Any = None,
        num_threads: Union[str, int] = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
        **sampling: Any,
    ) -> list["ProgramState"]:
        """Run many argument sets concurrently; results come back in input order.

        The program's constant prefix (found by tracing) is sent once first so it is cached.
        A program that raises does not sink the batch: its state carries the error.
        """
        from radixlm.interpreter import run_program_batch

        items = self._batch_kwargs(batch_kwargs)
        if not items:
            return []
        unknown = sorted(k for k in sampling if k not in SAMPLING_FIELDS)
        if unknown:
            raise ValueError(f"run_batch: unknown keyword argument(s) {unknown}")
        defaults = self._defaults(sampling, dict(
            return_logprob=return_logprob, logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs))
        return run_program_batch(self, _resolve_backend(backend), items, defaults, num_threads, progress_bar,
                                 generator_style=generator_style)

    def trace(self, *, backend: Any = None, **kwargs: Any):
        """Run the program symbolically (arguments unknown); returns the tracer state with its nodes."""
        from radixlm.tracer import trace_program

        return trace_program(self, kwargs, _resolve_backend(backend, required=False))

    def cache(self, backend: Any = None) -> Optional[str]:
        """Send the program's constant prefix to the backend so it is cached; returns the prefix."""
        from radixlm.interpreter import cache_program

        return cache_program(self, _resolve_backend(backend))

    def __call__(self, *args: Any, **kwargs: Any):
        from radixlm.tracer import current_tracer

        tracer = current_tracer()
        if tracer is not None:
            return self.trace(backend=tracer.backend, **kwargs)
        return self.run(*args, **kwargs)

    def __repr__(self) -> str:
        return f"SglFunction({self.func.__name__})"


def _resolve_backend(backend: Any, required: bool = True):
    from radixlm.backend import as_backend
    from radixlm.global_config import global_config

    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        if required:
            raise ValueError("backend: none given and no default set; call radixlm.set_default_backend(...)")
        return None
    return as_backend(backend)
