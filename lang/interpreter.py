"""The interpreter: each program state runs its expressions on its own worker thread.

``s += gen("x")`` validates the expression, queues it and returns at once; the state's worker thread
sends it to the backend. Reading ``s["x"]`` waits until that value exists (or the program failed,
in which case it raises ``ProgramError``). ``fork`` is a synchronisation point: it waits for the
parent, commits the parent's text to the backend once (so the branches hit the radix cache), and
copies the state into ``n`` children with their own workers.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from radixlm.chat_template import ChatTemplate
from radixlm.global_config import global_config
from radixlm.ir import (
    SglCommitLazy,
    SglConcateAndAppend,
    SglConstantText,
    SglExpr,
    SglGen,
    SglRaise,
    SglRoleBegin,
    SglRoleEnd,
    SglSamplingParams,
    SglSelect,
    SglSeparateReasoning,
    SglVarScopeBegin,
    SglVarScopeEnd,
    _as_expr,
    dtype_regex,
    flatten,
)
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.state import ProgramError, ProgramState, ProgramStateGroup

logger = logging.getLogger(__name__)

_STOP = object()  # queued by end(): the worker exits after everything before it


@dataclass
class Span:
    """A marked stretch of a state's text: a role message, or a generated / selected value."""

    start: int
    end: int
    kind: str  # "role" | "gen" | "select"
    name: Optional[str]


class StreamExecutor:
    """Executes one program state's expressions, in order, on a worker thread."""

    def __init__(
        self,
        backend: Any,
        arguments: dict[str, Any],
        default_sampling: SglSamplingParams,
        chat_template: Optional[ChatTemplate] = None,
        stream: bool = False,
    ):
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.default_sampling = default_sampling
        self.stream = stream
        self.chat_template: ChatTemplate = chat_template or backend.get_chat_template()

        # Results
        self.variables: dict[Any, Any] = {}
        self.variable_event: dict[Any, threading.Event] = {}
        self.meta_info: dict[Any, Any] = {}
        self.text_ = ""
        self.messages_: list[dict[str, Any]] = []  # OpenAI format
        self.spans: list[Span] = []
        self.error_: Optional[BaseException] = None

        # Execution-side role state
        self.cur_role: Optional[str] = None
        self.cur_role_begin_pos: Optional[int] = None  # where the current message's content starts
        self._role_open_pos: Optional[int] = None  # where its prefix starts (for rendering)
        self._scope_start: dict[str, int] = {}
        self.fork_start_text_pos: Optional[int] = None
        self.children: list["StreamExecutor"] = []

        # Submission-side state (checked on the caller's thread so bad programs fail at the call)
        self._submit_role: Optional[str] = None
        self._pending: dict[Any, int] = {}  # variable name -> queued writes not yet done

        # Worker machinery
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._closed = True  # the current queue ends with _STOP (or there is none)
        self._ended = False  # the program function returned: later appends run and stop again
        self._running = 0

    # ------------------------------------------------------------------ submission (caller thread)
    def submit(self, expr: Any) -> None:
        if expr is None:
            raise ValueError("cannot append None to a program state")
        expr = _as_expr(expr)
        with self._lock:
            self._check_roles(expr)
            for e in flatten(expr):
                for name in _var_names(e):
                    self._pending[name] = self._pending.get(name, 0) + 1
                    ev = self.variable_event.setdefault(name, threading.Event())
                    if self.error_ is None:
                        ev.clear()
                    else:
                        ev.set()  # a failed program never sets it: readers must not wait
            if self._closed:
                self._start_worker()
            assert self._queue is not None
            self._queue.put(expr)
            if self._ended:
                self._queue.put(_STOP)
                self._closed = True

    def _check_roles(self, expr: SglExpr) -> None:
        role = self._submit_role
        for e in flatten(expr):
            if isinstance(e, SglRoleBegin):
                if role is not None:
                    raise ValueError(f"nested roles: {e.role!r} begins while {role!r} is open")
                role = e.role
            elif isinstance(e, SglRoleEnd):
                if role != e.role:
                    raise ValueError(f"role end {e.role!r} does not match the open role {role!r}")
                role = None
        self._submit_role = role

    def _start_worker(self) -> None:
        prev = self._thread
        q: queue.Queue = queue.Queue()
        self._queue, self._closed = q, False
        self._running += 1
        self._thread = threading.Thread(
            target=self._worker, args=(q, prev), name=f"radixlm-state-{self.sid[:8]}", daemon=True
        )
        self._thread.start()

    def end(self) -> None:
        """The program function returned: let the worker exit once its queue is done."""
        with self._lock:
            self._ended = True
            if not self._closed and self._queue is not None:
                self._queue.put(_STOP)
                self._closed = True
            children = list(self.children)
        for c in children:
            c.end()
        self._notify()

    @property
    def is_finished(self) -> bool:
        return self._ended and self._running == 0

    # ------------------------------------------------------------------ worker
    def _worker(self, q: queue.Queue, prev: Optional[threading.Thread]) -> None:
        if prev is not None:
            prev.join()
        try:
            while True:
                expr = q.get()
                try:
                    if expr is _STOP:
                        return
                    for e in flatten(expr):
                        if self.error_ is not None:
                            break  # skip: readers were woken by _fail
                        try:
                            self._execute(e)
                        except Exception as err:  # noqa: BLE001 - any failure belongs to the program
                            self._fail(err)
                finally:
                    q.task_done()
        finally:
            with self._lock:
                self._running -= 1
            self._notify()

    def set_error(self, error: BaseException) -> None:
        """Mark the program failed (e.g. its function raised during run_batch)."""
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error_ is None:
                self.error_ = error
                logger.warning("radixlm program %s failed: %r", self.sid[:8], error)
            events = list(self.variable_event.values())
        for ev in events:
            ev.set()
        self._notify()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _done(self, name: Any) -> None:
        """A queued write of variable ``name`` finished: wake readers when none is left."""
        if name is None:
            return
        with self._lock:
            left = self._pending.get(name, 1) - 1
            self._pending[name] = left
            ev = self.variable_event.get(name)
        if left <= 0 and ev is not None:
            ev.set()
        self._notify()

    # ------------------------------------------------------------------ execution (worker thread)
    def _execute(self, e: SglExpr) -> None:
        if isinstance(e, SglConstantText):
            self._fill(str(e.value))
        elif isinstance(e, SglGen):
            self._execute_gen(e)
        elif isinstance(e, SglSelect):
            self._execute_select(e)
        elif isinstance(e, SglRoleBegin):
            self._execute_role_begin(e.role)
        elif isinstance(e, SglRoleEnd):
            self._execute_role_end(e.role)
        elif isinstance(e, SglVarScopeBegin):
            self._scope_start[e.name] = len(self.text_)
        elif isinstance(e, SglVarScopeEnd):
            self.variables[e.name] = self.text_[self._scope_start.pop(e.name, len(self.text_)) :]
            self._done(e.name)
        elif isinstance(e, SglCommitLazy):
            if self.text_:
                self.backend.commit_lazy_operations(self)
        elif isinstance(e, SglConcateAndAppend):
            self._execute_concatenate_and_append(e)
        elif isinstance(e, SglSeparateReasoning):
            self._execute_separate_reasoning(e)
        elif isinstance(e, SglRaise):
            raise e.error
        else:
            raise ValueError(f"cannot execute {e!r} (only tracing understands it)")

    def _fill(self, value: str) -> None:
        with self._cond:
            self.text_ += value
            self._cond.notify_all()

    def resolve_sampling_params(self, expr: SglGen) -> SglSamplingParams:
        """Run defaults < gen overrides < dtype < chat template stops, validated by SamplingParams."""
        base = self.default_sampling
        merged = base.sampling.to_dict()
        merged.update(expr.overrides)
        stop = list(merged.get("stop") or [])
        if expr.dtype is not None:
            regex, extra_stop = dtype_regex(expr.dtype)
            if merged.get("regex") or merged.get("json_schema"):
                logger.warning("gen %r: dtype=%s replaces regex/json_schema", expr.name, expr.dtype)
            merged["regex"], merged["json_schema"] = regex, None
            stop += [s for s in extra_stop if s not in stop]
        stop += [s for s in self.chat_template.stop_str if s not in stop]
        merged["stop"] = stop or None
        if self.chat_template.stop_token_ids:
            ids = list(merged.get("stop_token_ids") or [])
            merged["stop_token_ids"] = ids + [t for t in self.chat_template.stop_token_ids if t not in ids]
        return SglSamplingParams(SamplingParams.from_dict(merged), base.logprob.replace(**expr.logprob),
                                 dtype=expr.dtype)

    def _execute_gen(self, expr: SglGen) -> None:
        sp = self.resolve_sampling_params(expr)
        name, start = expr.name, len(self.text_)
        if not self.stream:
            comp, meta = self.backend.generate(self, sp)
            self._fill(comp[0] if isinstance(comp, list) else comp)
            value = comp
        else:
            if name is not None:
                self.variables[name] = ""
            value, meta = "", None
            for chunk, meta in self.backend.generate_stream(self, sp):
                with self._cond:
                    self.text_ += chunk
                    value += chunk
                    if name is not None:
                        self.variables[name] = value
                        self.meta_info[name] = meta
                    self._cond.notify_all()
        self.spans.append(Span(start, len(self.text_), "gen", name))
        if name is not None:
            self.variables[name] = value
            self.meta_info[name] = meta
            self._done(name)

    def _execute_select(self, expr: SglSelect) -> None:
        start = len(self.text_)
        decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
        self._fill(decision.decision)
        self.spans.append(Span(start, len(self.text_), "select", expr.name))
        if expr.name is not None:
            self.variables[expr.name] = decision.decision
            self.meta_info[expr.name] = decision.meta_info
            self._done(expr.name)

    def _execute_separate_reasoning(self, expr: SglSeparateReasoning) -> None:
        from radixlm.runtime.parsers.reasoning import get_reasoning_parser

        parser = get_reasoning_parser(expr.model_type)
        for name in expr.targets:
            value = self.variables.get(name, "")
            split = parser.split(value if isinstance(value, str) else "", final=True)
            with self._cond:
                self._replace_span(name, split.content)
                self.variables[name] = split.content
                self.variables[expr.reasoning_name(name)] = split.reasoning
                self._cond.notify_all()
            self._done(name)
            self._done(expr.reasoning_name(name))

    def _replace_span(self, name: str, text: str) -> None:
        """Put ``text`` where variable ``name``'s latest generation sits in the program text."""
        for k in range(len(self.spans) - 1, -1, -1):
            sp = self.spans[k]
            if sp.name == name and sp.kind in ("gen", "select"):
                delta = len(text) - (sp.end - sp.start)
                self.text_ = self.text_[: sp.start] + text + self.text_[sp.end :]
                self.spans[k] = Span(sp.start, sp.start + len(text), sp.kind, sp.name)
                for j in range(k + 1, len(self.spans)):
                    o = self.spans[j]
                    self.spans[j] = Span(o.start + delta, o.end + delta, o.kind, o.name)
                return

    def _execute_role_begin(self, role: str) -> None:
        if not self.messages_ and role != "system" and self.chat_template.default_system_prompt:
            self._execute_role_begin("system")
            self._fill(self.chat_template.default_system_prompt)
            self._execute_role_end("system")
        prefix, _ = self.chat_template.get_prefix_and_suffix(role, self.messages_)
        self._role_open_pos = len(self.text_)
        self._fill(prefix)
        self.cur_role, self.cur_role_begin_pos = role, len(self.text_)

    def _execute_role_end(self, role: str) -> None:
        begin = self.cur_role_begin_pos if self.cur_role_begin_pos is not None else len(self.text_)
        content = self.text_[begin:].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(role, self.messages_)
        self._fill(suffix)
        self.messages_.append({"role": role, "content": content})
        open_pos = self._role_open_pos if self._role_open_pos is not None else begin
        self.spans.append(Span(open_pos, len(self.text_), "role", role))
        self.cur_role = self.cur_role_begin_pos = self._role_open_pos = None

    def _execute_concatenate_and_append(self, expr: SglConcateAndAppend) -> None:
        added = ""
        for st in expr.states:
            exe = st.stream_executor
            exe.sync()
            if exe.error_ is not None:
                raise ProgramError(f"a forked branch failed: {exe.error_!r}") from exe.error_
            added += exe.text_[exe.fork_start_text_pos or 0 :]
        self._fill(added)

    # ------------------------------------------------------------------ reading
    def sync(self) -> None:
        q = self._queue
        if q is not None:
            q.join()

    def get_var(self, name: Any) -> Any:
        ev = self.variable_event.get(name)
        if ev is not None:
            ev.wait()
        if self.error_ is not None and (self._pending.get(name, 0) > 0 or name not in self.variables):
            raise ProgramError(f"the program failed before {name!r} was set: {self.error_!r}") from self.error_
        return self.variables[name]

    def set_var(self, name: Any, value: Any) -> None:
        self.variables[name] = value

    def get_meta_info(self, name: Any, timeout: Optional[float] = None) -> Any:
        ev = self.variable_event.get(name)
        if ev is not None and not ev.wait(timeout):
            raise TimeoutError(f"timed out waiting for {name!r}")
        return self.meta_info.get(name)

    def text(self) -> str:
        self.sync()
        return self.text_

    def messages(self) -> list[dict[str, Any]]:
        self.sync()
        return [dict(m) for m in self.messages_]

    def error(self) -> Optional[BaseException]:
        self.sync()
        return self.error_

    def var_done(self, name: Any) -> bool:
        ev = self.variable_event.get(name)
        return ev is None or ev.is_set()

    # ------------------------------------------------------------------ fork
    def fork(self, size: int = 1) -> list["StreamExecutor"]:
        size = int(size)
        if size < 1:
            raise ValueError(f"fork: size must be >= 1, got {size}")
        if size > 1:
            self.submit(SglCommitLazy())  # one request computes the shared prefix for every branch
        self.sync()
        kids = []
        for _ in range(size):
            c = StreamExecutor(self.backend, self.arguments, self.default_sampling, self.chat_template, self.stream)
            c.variables = dict(self.variables)
            c.meta_info = dict(self.meta_info)
            c.text_ = self.text_
            c.messages_ = [dict(m) for m in self.messages_]
            c.spans = list(self.spans)
            c.cur_role, c.cur_role_begin_pos, c._role_open_pos = self.cur_role, self.cur_role_begin_pos, self._role_open_pos
            c._submit_role = self._submit_role
            c.fork_start_text_pos = len(self.text_)
            c.error_ = self.error_
            kids.append(c)
        with self._lock:
            self.children.extend(kids)
        return kids


def _var_names(e: SglExpr) -> list[str]:
    """Variables ``e`` sets when it runs (readers wait for them)."""
    if isinstance(e, (SglGen, SglSelect, SglVarScopeEnd)):
        return [e.name] if e.name is not None else []
    if isinstance(e, SglSeparateReasoning):  # rewrites its targets and adds their reasoning
        return [n for t in e.targets for n in (t, e.reasoning_name(t))]
    return []


# --------------------------------------------------------------------------- running programs
def _run_body(state: ProgramState, program: Any, args: tuple, kwargs: dict, sync: bool, catch: bool) -> None:
    exe = state.stream_executor
    try:
        state.ret_value = program.func(state, *args, **kwargs)
    except Exception as e:
        if not catch:
            raise
        exe.set_error(e)
    finally:
        exe.end()
    if sync:
        exe.sync()
    if global_config.verbosity >= 1:
        logger.info("program %s:\n%s", exe.sid[:8], exe.text())


def run_program(
    program: Any,
    backend: Any,
    func_args: tuple,
    func_kwargs: dict[str, Any],
    default_sampling: SglSamplingParams,
    stream: bool = False,
    sync: bool = False,
    catch_errors: bool = False,
) -> ProgramState:
    """Start one program. Its function runs on this thread (on a new one when streaming)."""
    kwargs = {**func_kwargs, **program.bind_arguments}
    exe = StreamExecutor(backend, kwargs, default_sampling, None, stream)
    state = ProgramState(exe)
    if stream:
        threading.Thread(
            target=_run_body, args=(state, program, func_args, kwargs, sync, True), daemon=True
        ).start()
    else:
        _run_body(state, program, func_args, kwargs, sync, catch_errors)
    return state


def cache_program(program: Any, backend: Any) -> Optional[str]:
    """Send the program's constant prefix (by tracing) so the backend caches it; return it."""
    from radixlm.tracer import extract_prefix_by_tracing

    prefix = extract_prefix_by_tracing(program, backend)
    if prefix and len(prefix) >= global_config.precache_min_chars:
        backend.cache_prefix(prefix)
        return prefix
    return None


def _num_threads(num_threads: Union[str, int], n: int) -> int:
    if num_threads == "auto":
        num_threads = max(96, (os.cpu_count() or 1) * 16)
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be 'auto' or a positive int, got {num_threads!r}")
    return max(1, min(num_threads, n))


def run_program_batch(
    program: Any,
    backend: Any,
    batch_arguments: list[dict[str, Any]],
    default_sampling: SglSamplingParams,
    num_threads: Union[str, int] = "auto",
    progress_bar: bool = False,
    generator_style: bool = False,
) -> Union[list[ProgramState], Iterator[ProgramState]]:
    """Run programs concurrently (warming the cache with their shared prefix first)."""
    threads = _num_threads(num_threads, len(batch_arguments))
    if global_config.enable_precache_with_tracing and len(batch_arguments) > 1:
        try:
            cache_program(program, backend)
        except Exception as e:  # noqa: BLE001 - warming is an optimisation; programs still run
            logger.warning("run_batch: prefix warm-up failed: %r", e)

    def one(arguments: dict[str, Any]) -> ProgramState:
        return run_program(program, backend, (), arguments, default_sampling, stream=False, sync=True,
                           catch_errors=True)

    def results() -> Iterator[ProgramState]:
        pbar = _progress(len(batch_arguments)) if progress_bar else None
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="radixlm-batch") as pool:
                futures = [pool.submit(one, a) for a in batch_arguments]
                if pbar is not None:
                    for f in futures:
                        f.add_done_callback(lambda _f: pbar.update(1))
                for f in futures:
                    yield f.result()
        finally:
            if pbar is not None:
                pbar.close()

    return results() if generator_style else list(results())


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

    return tqdm(total=total)


__all__ = [
    "ProgramError",
    "ProgramState",
    "ProgramStateGroup",
    "Span",
    "StreamExecutor",
    "cache_program",
    "run_program",
    "run_program_batch",
]
