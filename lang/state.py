"""What a program holds: ``ProgramState`` (``s`` in ``@function def prog(s, ...)``) and the group
``s.fork(n)`` returns. Both only queue expressions on their ``StreamExecutor`` (radixlm.interpreter)
and read its results; the executor does the work on its own thread.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Optional

from radixlm.ir import (
    SglConcateAndAppend,
    SglExpr,
    SglExprList,
    SglRaise,
    SglRoleBegin,
    SglRoleEnd,
    SglVarScopeBegin,
    SglVarScopeEnd,
    _as_expr,
)

if TYPE_CHECKING:
    from radixlm.interpreter import StreamExecutor


class ProgramError(RuntimeError):
    """A program (or one of its forked branches) failed; ``__cause__`` holds the original error."""


# --------------------------------------------------------------------------- user-facing state
class _RoleMethods:
    """``s.system(...)``/``s.user(...)``/``s.assistant(...)`` and ``s.var_scope``, shared with the tracer."""

    def _append(self, expr: Any) -> None:
        raise NotImplementedError

    def _role(self, name: str, expr: Any = None):
        if expr is not None:
            self._append(SglExprList([SglRoleBegin(name), _as_expr(expr), SglRoleEnd(name)]))
            return None
        return self._role_scope(name)

    @contextmanager
    def _role_scope(self, name: str):
        self._append(SglRoleBegin(name))
        yield
        self._append(SglRoleEnd(name))

    def system(self, expr: Any = None):
        return self._role("system", expr)

    def user(self, expr: Any = None):
        return self._role("user", expr)

    def assistant(self, expr: Any = None):
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str):
        """Everything appended inside the block becomes variable ``name``."""
        self._append(SglVarScopeBegin(name))
        try:
            yield
        finally:
            self._append(SglVarScopeEnd(name))


class ProgramState(_RoleMethods):
    """The state of a running program: append with ``+=``, read with ``s["name"]`` or ``s.text()``."""

    def __init__(self, stream_executor: StreamExecutor):
        self.stream_executor = stream_executor
        self.ret_value: Any = None

    def _append(self, expr: Any) -> None:
        self.stream_executor.submit(expr)

    def __iadd__(self, other: Any) -> "ProgramState":
        self.stream_executor.submit(other)
        return self

    # reading
    def __getitem__(self, name: Any) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: Any, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def __contains__(self, name: Any) -> bool:
        exe = self.stream_executor
        return name in exe.variables or name in exe.variable_event

    def get_var(self, name: Any) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: Any, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: Any) -> Any:
        return self.stream_executor.get_meta_info(name)

    def text(self) -> str:
        return self.stream_executor.text()

    def messages(self) -> list[dict[str, Any]]:
        return self.stream_executor.messages()

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> Optional[BaseException]:
        return self.stream_executor.error()

    # branching
    def fork(self, size: int = 1, position_ids_offset: Optional[list[int]] = None) -> "ProgramStateGroup":
        return ProgramStateGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    @contextmanager
    def copy(self, position_ids_offset: Optional[list[int]] = None):
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # streaming
    def text_iter(self, var_name: Any = None) -> Iterator[str]:
        """Yield the text (or one variable) as it grows, until the program (or that variable) is done."""
        exe = self.stream_executor
        pos = 0

        def current() -> str:
            value = exe.text_ if var_name is None else exe.variables.get(var_name, "")
            return value if isinstance(value, str) else ""

        def done() -> bool:
            if exe.is_finished or exe.error_ is not None:
                return True
            return var_name is not None and var_name in exe.variable_event and exe.var_done(var_name)

        while True:
            with exe._cond:
                exe._cond.wait_for(lambda: len(current()) > pos or done())
                chunk, finished = current()[pos:], done()
            if chunk:
                pos += len(chunk)
                yield chunk
            if finished:
                return

    async def text_async_iter(self, var_name: Any = None, return_meta_data: bool = False) -> AsyncIterator[Any]:
        """Like ``text_iter``; with ``return_meta_data`` each chunk comes with the variable's meta_info.
        Against a server that streams deltas (``--incremental-streaming-output``) the logprob lists of
        that meta_info hold only the entries new since the previous chunk, as SGLang's frontend gives."""
        loop = asyncio.get_running_loop()
        it = self.text_iter(var_name)
        end = object()
        incremental = bool(getattr(self.stream_executor.backend, "incremental_stream", False))
        sent: dict[str, int] = {}
        while True:
            chunk = await loop.run_in_executor(None, next, it, end)
            if chunk is end:
                return
            if not return_meta_data:
                yield chunk
                continue
            meta = self.stream_executor.meta_info.get(var_name)
            if incremental and isinstance(meta, dict):
                meta = dict(meta)
                for k, v in meta.items():
                    if k.endswith("_logprobs") and isinstance(v, list):
                        meta[k], sent[k] = v[sent.get(k, 0):], len(v)
            yield chunk, meta

    # display
    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"

    def _repr_html_(self) -> str:
        from radixlm.render import render_state_html

        exe = self.stream_executor
        exe.sync()
        return render_state_html(exe.text_, exe.spans, exe.error_)

    def __del__(self) -> None:
        try:
            self.stream_executor.end()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class ProgramStateGroup:
    """The states returned by ``s.fork(n)``: ``forks += expr`` appends to each; ``join`` merges back."""

    def __init__(self, states: list[ProgramState], src_state: Optional[ProgramState] = None):
        self.states = states
        self.src_state = src_state

    def join(self, mode: str = "gather_variable") -> None:
        """``gather_variable``: each variable the branches created becomes a list in the parent.
        ``concate_and_append``: the text each branch added is appended to the parent, in order."""
        if self.src_state is None:
            raise ValueError("join: this group has no parent state")
        src = self.src_state.stream_executor
        if mode == "gather_variable":
            before = set(src.variables)
            for st in self.states:
                exe = st.stream_executor
                exe.sync()
                if exe.error_ is not None:
                    src.submit(SglRaise(ProgramError(f"a forked branch failed: {exe.error_!r}")))
                    break
                for k, v in exe.variables.items():
                    if k not in before:
                        src.variables.setdefault(k, []).append(v)
                        src.meta_info.setdefault(k, []).append(exe.meta_info.get(k))
        elif mode == "concate_and_append":
            self.src_state += SglConcateAndAppend(list(self.states))
        else:
            raise ValueError(f"join: mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
        for st in self.states:
            st.stream_executor.end()

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        """Only what ``forks[i] += expr`` does: ``+=`` returns the same state, which is stored back."""
        if value is not self.states[i]:
            raise TypeError("a fork group's states cannot be replaced; use forks[i] += expr")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> "ProgramStateGroup":
        if isinstance(other, (SglExpr, str)):
            for st in self.states:
                st += other
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"fork: {len(other)} items for {len(self.states)} branches")
            for st, x in zip(self.states, other):
                st += x
        elif callable(other):
            for i, st in enumerate(self.states):
                st += other(i)
        else:
            raise ValueError(f"cannot append {type(other).__name__} to forked states")
        return self
