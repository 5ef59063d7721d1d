"""TokenizerManager: the front process's request tracker (asyncio, one per server).

Both front doors (HTTP and ZeroMQ) call ``generate(GenerateReqInput)``: it validates and tokenizes
with the shared ``GenerateReqInput.normalize`` (batch and ``n`` expanded), registers each sequence
with the detokenizer, sends it to the scheduler, and yields ``GenEvent``s as the detokenizer's
outputs arrive. Closing the iterator early (a client went away) aborts every unfinished sequence,
which releases its KV at the scheduler's next step.

If the scheduler or detokenizer process dies, every waiting caller gets a ``ServerDeadError`` at
once and the ``on_dead`` callbacks run (the launcher stops the server). The errors themselves are in
``request_errors``; the native body parsing and stream chunks both front doors share, in ``native_api``.

What a caller holds (``RequestHandle``, ``GenEvent``) is in ``request_handle``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.protocol import (
    AbortReq,
    DetokBatchOut,
    DetokRegister,
    ErrorOut,
    FlushCacheOut,
    FlushCacheReq,
    ProfileOut,
    ProfileReq,
    GetStatsReq,
    HeartbeatOut,
    ReadyOut,
    StatsOut,
    TokenizedGenerateReq,
    decode_tokenizer_manager_input,
    encode,
)
from radixlm.runtime.server.ipc import IpcNames
from radixlm.runtime.server.metrics import ServerMetrics
from radixlm.runtime.server.request_errors import RequestError, ServerDeadError
from radixlm.runtime.server.request_handle import GenEvent, RequestHandle, Track
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.validation import RequestLimits, check_admission, check_requests

logger = logging.getLogger("radixlm.tokenizer_manager")


class TokenizerManager:
    def __init__(self, server_args: ServerArgs, ipc: IpcNames, tokenizer: Any, metrics: ServerMetrics | None = None):
        self.args = server_args
        self.ipc = ipc
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.model_info: dict = {}
        self.scheduler_pid: int | None = None
        self.dead_reason: str | None = None
        self.on_dead: list[Callable[[str], None]] = []
        self._tracks: dict[str, Track] = {}
        self._limits: RequestLimits | None = None
        self.last_heartbeat: float | None = None  # monotonic time of the scheduler's last HeartbeatOut
        self.heartbeat: HeartbeatOut | None = None
        # Tokenization and validation of incoming requests: off the event loop (see ``submit``).
        self._prep_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="radixlm-prepare")
        self._groups: dict[str, list[str]] = {}  # user-given rid → the rids it expanded into
        self._stats_waiters: deque[asyncio.Future] = deque()
        self.last_stats: dict[str, Any] = {}  # the scheduler's latest StatsOut, late answers included
        self._flush_waiters: deque[asyncio.Future] = deque()
        self._profile_waiters: deque[asyncio.Future] = deque()
        self._ready: asyncio.Future | None = None
        self._recv_task: asyncio.Task | None = None
        self._watched: list[Any] = []
        self._closed = False
        # Sends use a plain context with unbounded queues, so a send never blocks the event loop.
        self._ctx = zmq.Context(1)
        self._to_scheduler = self._push(ipc.scheduler)
        self._to_detokenizer = self._push(ipc.detokenizer)
        self._actx = zmq.asyncio.Context(1)
        self._recv = self._actx.socket(zmq.PULL)
        self._recv.bind(ipc.tokenizer)

    def _push(self, addr: str) -> zmq.Socket:
        s = self._ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
        return s

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self._recv_task = asyncio.create_task(self._recv_loop(), name="tokenizer-manager-recv")

    async def wait_ready(self, timeout: float | None = None) -> dict:
        """Wait for the scheduler's ReadyOut (model loaded); raises ServerDeadError if a child died first."""
        assert self._ready is not None, "call start() first"
        await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        return self.model_info

    def watch_process(self, proc: Any, name: str) -> None:
        """Fail everything as soon as ``proc`` (a multiprocessing.Process) exits."""
        loop = asyncio.get_running_loop()

        def on_exit() -> None:
            loop.remove_reader(proc.sentinel)
            proc.join(1.0)  # the sentinel fires as the process exits; reaping it may take a moment
            self.mark_dead(f"the {name} process exited (exit code {proc.exitcode})")

        loop.add_reader(proc.sentinel, on_exit)
        self._watched.append(proc)

    def mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        logger.error("server is dead: %s", reason)
        self.fail_all(ServerDeadError(f"server error: {reason}"))
        for cb in list(self.on_dead):
            cb(reason)

    def shutting_down(self) -> None:
        """Refuse new requests and end the running ones with a 503 (their KV is released by abort),
        so a graceful shutdown need not wait for long streams."""
        if self._closed or self.dead_reason is not None:
            return
        rids = list(self._tracks)
        self.fail_all(ServerDeadError("the server is shutting down"))
        for rid in rids:
            self._to_scheduler.send(encode(AbortReq(rid=rid)))
        self._closed = True

    def fail_all(self, err: RequestError) -> None:
        """Every waiting caller gets ``err`` now."""
        for t in self._tracks.values():
            t.queue.put_nowait(err)
        self._tracks.clear()
        self._groups.clear()
        for waiters in (self._stats_waiters, self._flush_waiters, self._profile_waiters):
            while waiters:
                f = waiters.popleft()
                if not f.done():
                    f.set_exception(err)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)

    def stall_seconds(self) -> float:
        """Seconds since the scheduler's loop last reported (0 before it is ready)."""
        return 0.0 if self.last_heartbeat is None else time.monotonic() - self.last_heartbeat

    def health_problem(self) -> str | None:
        """Why the server is not healthy now, or None: dead, starting, or a stalled scheduler (no
        heartbeat for --health-stall-timeout seconds: hung in a step, stopped, or overloaded)."""
        if not self.is_alive:
            return self.dead_reason or ("shutting down" if self._closed else "starting")
        stall = self.stall_seconds()
        if stall > self.args.health_stall_timeout:
            pending = f"; {self.num_active} requests waiting" if self.num_active else ""
            return f"the scheduler made no progress for {stall:.1f} s{pending}"
        return None

    @property
    def is_alive(self) -> bool:
        return self.dead_reason is None and not self._closed and self._ready is not None and self._ready.done()

    async def close(self) -> None:
        """Close the sockets; requests still open (cancelled at loop shutdown) then send nothing."""
        self._closed = True
        loop = asyncio.get_running_loop()
        for p in self._watched:
            try:
                loop.remove_reader(p.sentinel)
            except (ValueError, OSError):
                pass
        if self._recv_task is not None:
            self._recv_task.cancel()
        self._prep_pool.shutdown(wait=False, cancel_futures=True)
        self._recv.close(0)
        self._to_scheduler.close(0)
        self._to_detokenizer.close(0)
        self._actx.term()
        self._ctx.term()

    # ------------------------------------------------------------------ generation
    def _check_alive(self) -> None:
        if self._closed:
            raise ServerDeadError("the server is shutting down")
        if self.dead_reason is not None:
            raise ServerDeadError(f"server error: {self.dead_reason}")

    @property
    def limits(self) -> RequestLimits:
        """Admission limits: the server's flags and the model's sizes (known once the scheduler is ready)."""
        if self._limits is None or self._limits.vocab_size != self.model_info.get("vocab_size"):
            self._limits = RequestLimits.from_args(
                self.args, self.model_info.get("vocab_size"), self.model_info.get("context_length"), self.tokenizer
            )
        return self._limits

    def _prepare(self, obj: GenerateReqInput) -> tuple[list[TokenizedGenerateReq], list[tuple[bytes, bytes]]]:
        """Validate, tokenize, expand and encode (CPU work: runs on the preparation threads).

        Everything is encoded before anything is registered: a message that cannot be encoded fails the
        request with nothing tracked, nothing sent and no prompt of a batch running for nobody."""
        try:
            check_admission(obj, self.limits)
            reqs = obj.normalize(self.tokenizer)
            check_requests(reqs, self.limits)
        except (ValueError, TypeError) as e:  # TypeError: a wrong type normalize did not anticipate
            raise RequestError(str(e)) from None
        ctx = self.model_info.get("context_length")
        for r in reqs:
            if ctx and r.sampling_params.max_new_tokens > ctx:
                raise RequestError(
                    f"max_new_tokens: {r.sampling_params.max_new_tokens} is over the context length of {ctx}",
                    param="max_new_tokens",
                )
        try:
            frames = [
                (encode(DetokRegister(req=r)), encode(r))
                for r in reqs
            ]
        except (OverflowError, UnicodeEncodeError, TypeError, ValueError) as e:
            raise RequestError(f"the request cannot be encoded: {e}") from None
        return reqs, frames

    async def submit(self, obj: GenerateReqInput) -> "RequestHandle":
        """Validate, tokenize and send every sequence of ``obj``; iterate the handle for GenEvents.

        Tokenization and validation run on a small thread pool, so a large request never holds the event
        loop (other clients' streams) while it is prepared. Raises RequestError for bad input (400) or a
        dead server (503) before anything is registered. The handle must be closed (``async with`` /
        ``close()``): closing early aborts the rest.
        """
        self._check_alive()
        loop = asyncio.get_running_loop()
        reqs, frames = await loop.run_in_executor(self._prep_pool, self._prepare, obj)
        self._check_alive()  # the server may have died while this request was prepared
        for r in reqs:
            if r.rid in self._tracks:
                raise RequestError(f"rid: a request with id {r.rid!r} is already running", param="rid")
        queue: asyncio.Queue = asyncio.Queue()
        tracks = [Track(rid=r.rid, index=i, queue=queue) for i, r in enumerate(reqs)]
        group = obj.rid if isinstance(obj.rid, str) and (len(reqs) > 1 or obj.rid != reqs[0].rid) else None
        for t, r, (register, request) in zip(tracks, reqs, frames):
            self._tracks[r.rid] = t
            # Registration first: the detokenizer must know the rid before its first output.
            self._to_detokenizer.send(register)
            self._to_scheduler.send(request)
        if group:
            self._groups[group] = [r.rid for r in reqs]
        return RequestHandle(self, reqs, tracks, queue, group, self.args.request_timeout)

    async def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU-heavy request preparation (chat templates, OpenAI prompt tokenization) off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._prep_pool, fn, *args)

    async def generate(self, obj: GenerateReqInput) -> AsyncIterator[GenEvent]:
        """``submit`` + iterate; for callers that need no early 400 before the first event."""
        handle = await self.submit(obj)
        try:
            async for ev in handle:
                yield ev
        finally:
            handle.close()

    def abort(self, rid: str) -> bool:
        """Abort a running request by its rid (or the user rid of a batch / n>1 request)."""
        rids = self._groups.get(rid, [rid])
        found = False
        for r in rids:
            t = self._tracks.get(r)
            if t is not None:
                found = True
                self._send_abort(r)
        return found

    def release(self, tracks: list[Track], group: str | None) -> None:
        """A handle closed: abort its unfinished sequences (their KV is freed at the next step) and
        forget its group."""
        for t in tracks:
            if not t.finished and self._tracks.pop(t.rid, None) is not None:
                self._send_abort(t.rid)
        if group:
            self._groups.pop(group, None)

    def abort_all(self) -> int:
        """Abort every running request (SGLang's ``abort_all``); returns how many."""
        rids = list(self._tracks)
        for r in rids:
            self._send_abort(r)
        return len(rids)

    def _send_abort(self, rid: str) -> None:
        if self.dead_reason is None and not self._closed:
            self._to_scheduler.send(encode(AbortReq(rid=rid)))

    @property
    def num_active(self) -> int:
        return len(self._tracks)

    # ------------------------------------------------------------------ control
    async def get_stats(self, timeout: float = 10.0) -> dict:
        self._check_alive()
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        self._to_scheduler.send(encode(GetStatsReq()))
        out: StatsOut = await asyncio.wait_for(fut, timeout)
        if self.metrics is not None:
            self.metrics.set_scheduler_stats(out.stats)
        return out.stats

    async def profile(self, action: str, output_dir: str = "", timeout: float = 120.0) -> ProfileOut:
        """Start or stop the scheduler's torch profiler (stop writes the trace; it may take a while)."""
        self._check_alive()
        fut = asyncio.get_running_loop().create_future()
        self._profile_waiters.append(fut)
        self._to_scheduler.send(encode(ProfileReq(action=action, output_dir=output_dir)))
        return await asyncio.wait_for(fut, timeout)

    async def flush_cache(self, timeout: float = 30.0) -> FlushCacheOut:
        self._check_alive()
        fut = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        self._to_scheduler.send(encode(FlushCacheReq()))
        return await asyncio.wait_for(fut, timeout)

    # ------------------------------------------------------------------ receiving
    async def _recv_loop(self) -> None:
        while True:
            data = await self._recv.recv()
            try:
                msg = decode_tokenizer_manager_input(data)
            except (msgspec.DecodeError, RecursionError) as e:
                logger.error("malformed message on the tokenizer socket: %s", e)
                continue
            try:
                self._dispatch(msg)
            except Exception:  # noqa: BLE001 - a bug here must not stop the loop for everyone
                logger.exception("tokenizer manager failed to dispatch %s", type(msg).__name__)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, DetokBatchOut):
            now = time.monotonic()
            for o in msg.outputs:
                t = self._tracks.get(o.rid)
                if t is None:
                    continue  # aborted by us, or a late output after an error
                self._observe(t, o.num_new_tokens, now)
                if o.finished:
                    t.finished = True
                    del self._tracks[o.rid]
                    if self.metrics is not None:
                        self.metrics.observe_finished(now - t.created, (o.data or {}).get("meta_info"))
                if o.data is not None:
                    t.queue.put_nowait(GenEvent(t.index, o.data, o.finished))
        elif isinstance(msg, ErrorOut):
            t = self._tracks.pop(msg.rid, None) if msg.rid else None
            if t is None:
                logger.warning("scheduler error: %s", msg.message)
            else:
                t.finished = True
                t.queue.put_nowait(RequestError(msg.message))
        elif isinstance(msg, StatsOut):
            self.last_stats = msg.stats
            _resolve(self._stats_waiters, msg)
        elif isinstance(msg, FlushCacheOut):
            _resolve(self._flush_waiters, msg)
        elif isinstance(msg, ProfileOut):
            _resolve(self._profile_waiters, msg)
        elif isinstance(msg, HeartbeatOut):
            self.last_heartbeat = time.monotonic()
            self.heartbeat = msg
        elif isinstance(msg, ReadyOut):
            self.last_heartbeat = time.monotonic()
            self.model_info = dict(msg.model_info)
            self.scheduler_pid = msg.pid
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)

    def _observe(self, t: Track, n_new: int, now: float) -> None:
        if n_new <= 0 or self.metrics is None:
            return
        if t.first_token is None:
            t.first_token = now
            self.metrics.observe_ttft(now - t.created)
        elif t.last_token is not None:
            self.metrics.observe_itl((now - t.last_token) / n_new)
        t.last_token = now


def _resolve(waiters: deque, value: Any) -> None:
    while waiters:
        f = waiters.popleft()
        if not f.done():
            f.set_result(value)
            return
