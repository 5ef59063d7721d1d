"""Tracing: run a program with placeholder arguments to find what it does without a backend.

``extract_prefix_by_tracing`` returns the constant text every run of a program starts with (used by
``run_batch`` to warm the cache once). Tracing stops at the first thing whose value is unknown: a
``gen``/``select``, an argument, a fork. ``trace_program`` records the whole expression list.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator, Optional

from radixlm.chat_template import get_chat_template
from radixlm.state import _RoleMethods
from radixlm.ir import (
    SglArgument,
    SglConstantText,
    SglExpr,
    SglFork,
    SglGen,
    SglGetForkItem,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglVariable,
    SglVarScopeBegin,
    SglVarScopeEnd,
    _as_expr,
    flatten,
)

logger = logging.getLogger(__name__)
_local = threading.local()


class StopTracing(Exception):
    pass


def current_tracer() -> Optional["TracerProgramState"]:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


class _TracingScope:
    def __init__(self, tracer: "TracerProgramState"):
        self.tracer = tracer

    def __enter__(self) -> "_TracingScope":
        if not hasattr(_local, "stack"):
            _local.stack = []
        _local.stack.append(self.tracer)
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.stack.pop()


class TracerProgramState(_RoleMethods):
    """A stand-in program state that records expressions instead of running them."""

    def __init__(self, backend: Any, arguments: dict[str, Any], only_trace_prefix: bool):
        self.backend = backend
        self.arguments = arguments
        self.only_trace_prefix = only_trace_prefix
        self.nodes: list[SglExpr] = []
        self.variables: dict[str, SglVariable] = {}
        self.messages_: list[dict[str, Any]] = []
        self.cur_role: Optional[str] = None
        self.chat_template = backend.get_chat_template() if backend is not None else get_chat_template("default")
        self.child_states: list[TracerProgramState] = []
        self.ret_value: Any = None

    def _append(self, expr: Any) -> None:
        for e in flatten(_as_expr(expr)):
            self._trace(e)

    def __iadd__(self, other: Any) -> "TracerProgramState":
        if other is None:
            raise ValueError("cannot append None to a program state")
        self._append(other)
        return self

    def _trace(self, e: SglExpr) -> None:
        if isinstance(e, SglConstantText):
            self.nodes.append(e)
        elif isinstance(e, (SglGen, SglSelect)):
            name = e.name if e.name is not None else f"{type(e).__name__.lower()}_{len(self.variables)}"
            self.variables[name] = SglVariable(name, e)
            self.nodes.append(e)
            if self.only_trace_prefix:
                raise StopTracing()
        elif isinstance(e, SglRoleBegin):
            if self.cur_role is not None:
                raise ValueError(f"nested roles: {e.role!r} begins while {self.cur_role!r} is open")
            if not self.messages_ and e.role != "system" and self.chat_template.default_system_prompt:
                self._trace(SglRoleBegin("system"))
                self._trace(SglConstantText(self.chat_template.default_system_prompt))
                self._trace(SglRoleEnd("system"))
            self.cur_role = e.role
            self.nodes.append(SglConstantText(self.chat_template.get_prefix_and_suffix(e.role, self.messages_)[0]))
        elif isinstance(e, SglRoleEnd):
            self.nodes.append(SglConstantText(self.chat_template.get_prefix_and_suffix(e.role, self.messages_)[1]))
            self.messages_.append({"role": e.role, "content": ""})
            self.cur_role = None
        elif isinstance(e, SglVarScopeBegin):
            pass
        elif isinstance(e, SglVarScopeEnd):
            self.variables[e.name] = SglVariable(e.name, self.nodes[-1] if self.nodes else None)
        else:
            if self.only_trace_prefix:
                raise StopTracing()
            self.nodes.append(e)

    # reading: values are unknown while tracing
    def get_var(self, name: str) -> Any:
        if name in self.arguments and self.arguments[name] is not None:
            return self.arguments[name]
        if self.only_trace_prefix:
            raise StopTracing()
        v = self.variables[name]
        return SglVariable(v.name, v.source)

    __getitem__ = get_var

    def __contains__(self, name: str) -> bool:
        return name in self.variables

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> "_TracerGroup":
        if self.only_trace_prefix:
            raise StopTracing()
        fork_node = SglFork(size)
        self.nodes.append(fork_node)
        kids = []
        for i in range(size):
            k = TracerProgramState(self.backend, self.arguments, self.only_trace_prefix)
            k.nodes = [SglGetForkItem(i)]
            k.variables, k.messages_, k.cur_role = dict(self.variables), list(self.messages_), self.cur_role
            kids.append(k)
        self.child_states.extend(kids)
        return _TracerGroup(kids)

    def flatten_nodes(self) -> list[SglExpr]:
        return [y for x in self.nodes for y in flatten(x)]

    def prefix(self) -> str:
        """The constant text before the first non-constant node."""
        out = ""
        for e in self.flatten_nodes():
            if not isinstance(e, SglConstantText):
                break
            out += e.value
        return out

    def text(self) -> str:
        return self.prefix()


class _TracerGroup:
    def __init__(self, states: list[TracerProgramState]):
        self.states = states

    def __getitem__(self, i: int) -> TracerProgramState:
        return self.states[i]

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[TracerProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> "_TracerGroup":
        for i, st in enumerate(self.states):
            if isinstance(other, (list, tuple)):
                st += other[i]
            elif callable(other) and not isinstance(other, SglExpr):
                st += other(i)
            else:
                st += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        pass


def _dummy_arguments(program: Any, given: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {n: SglArgument(n) for n in program.arg_names if n not in given}
    args.update(given)
    args.update(program.bind_arguments)
    return args


def extract_prefix_by_tracing(program: Any, backend: Any) -> str:
    """The constant text every run of ``program`` starts with ("" when there is none)."""
    tracer = TracerProgramState(backend, _dummy_arguments(program, {}), only_trace_prefix=True)
    try:
        with _TracingScope(tracer):
            tracer.ret_value = program.func(tracer, **tracer.arguments)
    except StopTracing:
        pass
    except Exception as e:  # noqa: BLE001 - using an unknown argument ends the prefix (TypeError etc.)
        logger.debug("tracing %s stopped: %r", program, e)
    return tracer.prefix()


def trace_program(program: Any, arguments: dict[str, Any], backend: Any) -> TracerProgramState:
    """Trace the whole program (arguments not given are placeholders)."""
    tracer = TracerProgramState(backend, _dummy_arguments(program, dict(arguments)), only_trace_prefix=False)
    with _TracingScope(tracer):
        tracer.ret_value = program.func(tracer, **tracer.arguments)
    return tracer
