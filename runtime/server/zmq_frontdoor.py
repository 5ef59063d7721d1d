"""The ZeroMQ front door for DSL clients: a ROUTER socket in the front process beside HTTP.

Wire (see protocol.py): a client DEALER sends ``ClientGenerate(req_id, body)`` where body is SGLang's
/generate body, ``ClientAbort(req_id)`` or ``ClientCommand(req_id, command)``; the server answers with
``ClientChunk``s (stream chunks with finished=False, then the final answer with finished=True) or one
``ClientError``. A REQ socket also works for one-shot calls (the empty delimiter frame is echoed).
Malformed bytes — garbage, a pickle, an empty message, extra frames — get a ClientError; nothing is
ever executed and the loop keeps serving. A message over the size limit gets a 413 ClientError; one
over twice the limit is refused by ZeroMQ itself (ZMQ_MAXMSGSIZE, which drops that connection) so a
huge message is never buffered.

Disconnects: ZeroMQ hides peers, so the socket monitor reports DISCONNECTED with the connection's
file descriptor, and every message records its source fd (ZMQ_SRCFD). A disconnect aborts the
requests of every client identity last seen on that fd. The monitor queue is drained before each
message is handled: the fd can only be reused after its DISCONNECTED event was queued, so a new
client that reuses it is never mistaken for the old one.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from radixlm.runtime.protocol import (
    ClientAbort,
    ClientChunk,
    ClientCommand,
    ClientError,
    ClientGenerate,
    decode_front_door_request,
    encode,
)
from radixlm.runtime.server.native_api import parse_generate_body
from radixlm.runtime.server.native_stream import native_streamers
from radixlm.runtime.server.request_errors import RequestError
from radixlm.runtime.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger("radixlm.frontdoor")


class FrontDoor:
    def __init__(self, tm: TokenizerManager, host: str, api_key: str | None, max_msg_bytes: int,
                 commands: dict[str, Any] | None = None):
        """``commands``: name → async callable returning a msgpack-able answer (get_server_info, ...)."""
        self.tm = tm
        self.api_key = api_key
        self.commands = commands or {}
        self._ctx = zmq.asyncio.Context(1)
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.max_msg_bytes = max_msg_bytes
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_msg_bytes + 4096)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        # ZMTP heartbeats: a peer that vanished without closing (a dead host) is dropped after 15 s,
        # which the monitor reports like any other disconnect.
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        bind_host = f"[{host}]" if ":" in host else host
        port = self.sock.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{bind_host}:{port}"
        # The asyncio sockets are only polled; receives and sends go through plain (shadow) sockets
        # with NOBLOCK, which return data rather than futures and never wait.
        self._rsock = zmq.Socket.shadow(self.sock.underlying)
        self._rmon = zmq.Socket.shadow(self.monitor.underlying)
        self._tasks: dict[bytes, dict[str, asyncio.Task]] = {}  # identity → req_id → task
        self._fd: dict[bytes, int] = {}  # identity → fd it was last seen on
        self._loop_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="zmq-frontdoor")
        self._loop_task.add_done_callback(_log_crash)

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        for tasks in self._tasks.values():
            for t in tasks.values():
                t.cancel()
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self._ctx.term()

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            # ZeroMQ's notification fd is edge-triggered and our sends (from other tasks) can consume an
            # edge; the timeout bounds the delay of a missed one to 50 ms.
            await poller.poll(timeout=50)
            self._drain_monitor()
            while True:
                try:
                    frames = self._rsock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._drain_monitor()
                try:
                    self._on_frames(frames)
                except Exception:  # noqa: BLE001 - never let one message stop the door
                    logger.exception("front door failed on a message")

    def _drain_monitor(self) -> None:
        while True:
            try:
                parts = self._rmon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            ev = parse_monitor_message(parts)
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                fd = ev["value"]
                for ident in [i for i, f in self._fd.items() if f == fd]:
                    del self._fd[ident]
                    for task in self._tasks.pop(ident, {}).values():
                        task.cancel()  # the task's finally aborts its requests

    def _on_frames(self, frames: list) -> None:
        ident = frames[0].bytes
        try:
            self._fd[ident] = frames[-1].get(zmq.SRCFD)
        except zmq.ZMQError:
            pass
        envelope: list[bytes] = [ident]
        payload = frames[1:]
        if len(payload) == 2 and len(payload[0].bytes) == 0:  # REQ socket: [b"", message]
            envelope.append(b"")
            payload = payload[1:]
        if len(payload) != 1:
            self._send(envelope, ClientError(message=f"expected one message frame, got {len(payload)}"))
            return
        data = payload[0].bytes
        if not data:
            self._send(envelope, ClientError(message="empty message"))
            return
        if len(data) > self.max_msg_bytes:
            self._send(envelope, ClientError(message=f"message of {len(data)} bytes is over the limit of "
                                                     f"{self.max_msg_bytes} bytes", status=413))
            return
        try:
            msg = decode_front_door_request(data)
        except (msgspec.DecodeError, RecursionError) as e:
            self._send(envelope, ClientError(message=f"malformed message (expected msgpack ClientGenerate, "
                                                     f"ClientAbort or ClientCommand): {e}"))
            return
        if self.api_key and not hmac.compare_digest((msg.api_key or "").encode(), self.api_key.encode()):
            self._send(envelope, ClientError(req_id=msg.req_id, message="invalid or missing API key", status=401))
            return
        if isinstance(msg, ClientAbort):
            task = self._tasks.get(ident, {}).get(msg.req_id)
            if task is not None:
                task.cancel()
            return
        tasks = self._tasks.setdefault(ident, {})
        if msg.req_id in tasks:
            self._send(envelope, ClientError(req_id=msg.req_id, message=f"req_id {msg.req_id!r} is already running"))
            return
        coro = self._generate(envelope, msg) if isinstance(msg, ClientGenerate) else self._command(envelope, msg)
        task = asyncio.create_task(coro)
        tasks[msg.req_id] = task
        task.add_done_callback(lambda _t, i=ident, r=msg.req_id: self._tasks.get(i, {}).pop(r, None))

    def _send(self, envelope: list[bytes], msg: msgspec.Struct) -> None:
        try:
            self._rsock.send_multipart([*envelope, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the peer is gone or unroutable: nothing to tell it
            logger.debug("front door send failed: %s", e)

    # ------------------------------------------------------------------ requests
    async def _generate(self, envelope: list[bytes], msg: ClientGenerate) -> None:
        try:
            obj = parse_generate_body(msg.body)
            handle = await self.tm.submit(obj)
        except RequestError as e:
            self._send(envelope, ClientError(req_id=msg.req_id, message=str(e), status=e.status))
            return
        single = len(handle.reqs) == 1 and not obj.is_batch
        streamers = native_streamers(self.tm.args, handle.reqs)
        results: list[Any] = [None] * len(handle.reqs)
        try:
            async for ev in handle:
                if obj.stream:
                    chunk = streamers[ev.index].add(ev.data)
                    if chunk is not None:
                        if not single:
                            chunk["index"] = ev.index
                        self._send(envelope, ClientChunk(req_id=msg.req_id, data=chunk))
                    if ev.finished:
                        results[ev.index] = streamers[ev.index].final()
                elif ev.finished:
                    results[ev.index] = ev.data
            self._send(envelope, ClientChunk(req_id=msg.req_id, data=results[0] if single else results, finished=True))
        except RequestError as e:
            self._send(envelope, ClientError(req_id=msg.req_id, message=str(e), status=e.status))
        finally:
            handle.close()

    async def _command(self, envelope: list[bytes], msg: ClientCommand) -> None:
        fn = self.commands.get(msg.command)
        if fn is None:
            self._send(envelope, ClientError(req_id=msg.req_id, message=f"command {msg.command!r} is not available"))
            return
        try:
            data = await fn()
        except RequestError as e:
            self._send(envelope, ClientError(req_id=msg.req_id, message=str(e), status=e.status))
            return
        except Exception as e:  # noqa: BLE001
            logger.exception("front door command %s failed", msg.command)
            self._send(envelope, ClientError(req_id=msg.req_id, message=f"internal error: {e}", status=500))
            return
        self._send(envelope, ClientChunk(req_id=msg.req_id, data=data, finished=True))


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the ZeroMQ front door stopped", exc_info=task.exception())
