"""Engine: the runtime in-process, like ``sglang.Engine``.

A background thread owns the Scheduler and runs its loop; ``generate`` may be called from any number
of threads (or awaited with ``async_generate``). Requests travel as the same protocol Structs the
server sends over ZeroMQ, and results are assembled by the same ``RequestState`` as the server's,
so the two front doors cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator

from radixlm.runtime.sglang_compat import split_sglang_extras
from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.request_state import RequestState
from radixlm.runtime.protocol import AbortReq, ErrorOut, ReqOutput, TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.validation import check_admission, check_requests

logger = logging.getLogger(__name__)

_STOP = object()


class EngineError(RuntimeError):
    """The engine's scheduler thread failed; every pending request sees this."""


class Engine:
    def __init__(self, model_path: str | None = None, server_args: ServerArgs | None = None, **kwargs: Any):
        if server_args is None:
            if model_path is None:
                raise ValueError("model_path is required")
            server_args = ServerArgs.from_kwargs(model_path=model_path, **kwargs)
        elif kwargs or model_path:
            server_args = server_args.replace(**({"model_path": model_path} if model_path else {}), **kwargs)
        if server_args.dp_size > 1:
            raise ValueError("dp_size > 1 is a server setting (radixlm serve --dp-size); an Engine is one replica")
        if server_args.node_rank > 0:
            raise ValueError("node_rank > 0 runs tensor-parallel followers only: use radixlm serve on that node")
        self._tp_procs: list = []
        if server_args.tp_size > 1:
            from radixlm.runtime.distributed.worker import start_followers, with_dist_addr

            server_args = with_dist_addr(server_args)
            self._tp_procs = start_followers(server_args)
        self.server_args = server_args
        try:
            self.scheduler = Scheduler(server_args)
        except BaseException:
            self._stop_tp(wait_s=0.0)  # the followers may be waiting for a rank 0 that never comes
            raise
        self.tokenizer = self.scheduler.tokenizer
        self.limits = self.scheduler.limits
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._states: dict[str, tuple[RequestState, queue.Queue]] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="radixlm-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            try:
                block = not sched.has_work()
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            try:
                while item is not None:
                    if item is _STOP:
                        sched.close()
                        return
                    if callable(item):
                        item()
                    else:
                        for out in sched.handle(item):
                            if isinstance(out, ErrorOut):
                                self._route(out.rid, out)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if sched.has_work():
                    for out in sched.step():
                        self._route(out.rid, out)
            except BaseException as e:  # noqa: BLE001 - fail every waiter instead of hanging them
                logger.exception("scheduler thread failed")
                self._error = e
                with self._lock:
                    for _, q in self._states.values():
                        q.put(e)
                return

    def _route(self, rid: str, out: ReqOutput | ErrorOut) -> None:
        with self._lock:
            entry = self._states.get(rid)
        if entry is not None:
            entry[1].put(out)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the scheduler thread and return its result."""
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        self._check_alive()
        self._inbox.put(run)
        return fut.result()

    def _check_alive(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineError(f"the engine has stopped: {self._error!r}")

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] | None = None,
        token_ids_logprob: list[int] | list[list[int]] | None = None,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
        priority: int | None = None,
        cache_salt: str | list[str] | None = None,
        extra_key: str | list[str] | None = None,
        **sglang_fields: Any,
    ) -> dict | list[dict] | Iterator[dict]:
        """SGLang's Engine.generate: a dict for one prompt (n=1), else a list; an iterator if stream.

        The arguments are a ``/generate`` body (``prompt`` is its ``text``): they become the same
        ``GenerateReqInput`` the server builds, with the same checks (ValueError naming the field).
        ``cache_salt`` / ``extra_key``: a KV cache namespace; the request reuses (and leaves) cached
        prefixes only among requests with the same values (see ``generate_request.cache_namespace``).
        ``sglang_fields``: SGLang's other Engine.generate arguments (``lora_path=None``, ...), with the
        /generate body's rules (runtime/sglang_compat.py): empty ones accepted, others a ValueError."""
        if isinstance(sampling_params, SamplingParams):
            sampling_params = sampling_params.to_dict()
        obj = GenerateReqInput.from_dict(dict(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            rid=rid,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            token_ids_logprob=token_ids_logprob,
            return_text_in_logprobs=return_text_in_logprobs,
            stream=stream,
            priority=priority,
            cache_salt=cache_salt,
            extra_key=extra_key,
            **split_sglang_extras(sglang_fields),  # what is left is unknown: from_dict names it
        ))
        check_admission(obj, self.limits)
        reqs = obj.normalize(self.tokenizer)
        check_requests(reqs, self.limits)
        single = not obj.is_batch and len(reqs) == 1
        states = self._submit(reqs)
        if stream:
            return self._stream(states, single)
        results = self._wait_all(states)
        return results[0] if single else results

    def _submit(self, reqs: list[TokenizedGenerateReq]) -> list[tuple[RequestState, queue.Queue]]:
        self._check_alive()
        entries = []
        with self._lock:
            for r in reqs:
                if r.rid in self._states:
                    raise ValueError(f"rid: a request with id {r.rid!r} is already running")
            for r in reqs:
                entry = (RequestState(r, self.tokenizer), queue.Queue())
                self._states[r.rid] = entry
                entries.append(entry)
        for r in reqs:
            self._inbox.put(r)
        return entries

    def _next(self, state: RequestState, q: queue.Queue) -> None:
        """Wait for and apply the next output of one request."""
        item = q.get()
        if isinstance(item, BaseException):
            raise EngineError(f"the engine failed: {item!r}") from item
        if isinstance(item, ErrorOut):
            state.finished = True
            state.error = item.message
            raise ValueError(item.message)
        state.update(item)
        if state.error and state.finished:
            raise ValueError(state.error)

    def _forget(self, entries) -> None:
        with self._lock:
            for state, _ in entries:
                self._states.pop(state.rid, None)

    def _wait_all(self, entries) -> list[dict]:
        try:
            for state, q in entries:
                while not state.finished:
                    self._next(state, q)
            return [state.result() for state, _ in entries]
        except BaseException:
            for state, _ in entries:
                if not state.finished:
                    self._inbox.put(AbortReq(rid=state.rid))
            raise
        finally:
            self._forget(entries)

    def _stream(self, entries, single: bool) -> Iterator[dict]:
        try:
            for index, (state, q) in enumerate(entries):
                # a chunk every stream_interval tokens (the request's, else the engine's), and the last
                interval = state.req.sampling_params.stream_interval or self.server_args.stream_interval
                sent = 0
                while not state.finished:
                    self._next(state, q)
                    if not state.finished and state.completion_tokens - sent < interval:
                        continue
                    sent = state.completion_tokens
                    chunk = state.result(streaming=not state.finished)
                    if not single:
                        chunk["index"] = index
                    yield chunk
        finally:
            for state, _ in entries:
                if not state.finished:  # the consumer stopped early: abort
                    self._inbox.put(AbortReq(rid=state.rid))
            self._forget(entries)

    async def async_generate(self, *args: Any, **kwargs: Any):
        """Awaitable generate; with stream=True returns an async iterator."""
        if kwargs.get("stream"):
            it = self.generate(*args, **kwargs)

            async def agen():
                while True:
                    chunk = await asyncio.to_thread(next, it, None)
                    if chunk is None:
                        return
                    yield chunk

            return agen()
        return await asyncio.to_thread(self.generate, *args, **kwargs)

    # ------------------------------------------------------------------ control
    def abort(self, rid: str) -> None:
        self._inbox.put(AbortReq(rid=rid))

    def flush_cache(self) -> dict:
        ok, message = self._call(self.scheduler.flush_cache)
        return {"success": ok, "message": message}

    def get_server_info(self) -> dict:
        """The same shape as the server's ``/get_server_info``: server args (minus the API key),
        ``model_info`` and the scheduler's live ``scheduler_stats``."""
        import dataclasses

        import radixlm

        info = {k: v for k, v in dataclasses.asdict(self.server_args).items() if k != "api_key"}
        info.update(version=radixlm.__version__, model_info=dict(self.scheduler.model_info))
        info["scheduler_stats"] = self._call(self.scheduler.get_stats)
        return info

    def get_model_info(self) -> dict:
        """The scheduler's model info plus how prompts are written (chat template, special tokens,
        stop strings, EOS ids), as the server's ``/get_model_info`` gives them."""
        from radixlm.runtime.prompt_format import prompt_format_info
        from radixlm.runtime.prompt_format import load_chat_template

        info = dict(self.scheduler.model_info)
        template = load_chat_template(self.server_args.chat_template)
        return {**info, **prompt_format_info(self.tokenizer, template, list(info.get("eos_token_ids", [])))}

    def check_memory(self) -> None:
        """Assert the KV invariant (free + evictable + protected == total); waits until idle."""
        self._call(self._wait_idle_then_check)

    def _wait_idle_then_check(self) -> None:
        # Runs on the scheduler thread; drain pending work first so 'idle' is real.
        while self.scheduler.has_work():
            for out in self.scheduler.step():
                self._route(out.rid, out)
        self.scheduler.check_memory()

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(_STOP)
            self._thread.join(timeout=30)
        self.scheduler.runner.close()
        self._stop_tp()

    def _stop_tp(self, wait_s: float = 10.0) -> None:
        for p in self._tp_procs:
            p.join(timeout=wait_s)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._tp_procs = []

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
