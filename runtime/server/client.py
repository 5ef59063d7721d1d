"""Clients of the ZeroMQ front door, for DSL programs (``radixlm.Runtime(...).endpoint``) and scripts.

``FrontDoorClient`` is synchronous and thread-safe (one DEALER socket per thread, so each thread is its
own client identity); ``AsyncFrontDoorClient`` serves one asyncio event loop. Bodies are SGLang's
/generate bodies; answers are the same dicts /generate returns. Errors raise ``FrontDoorError``.
Closing a stream early (``break`` out of the iterator) aborts the request on the server; so does
closing the client or exiting the process (the server sees the connection drop).

Liveness: ``FrontDoorClient`` never waits on a dead server. Its sockets use ZeroMQ heartbeats (a PING
every ``HEARTBEAT_IVL_S``; no answer within ``HEARTBEAT_TIMEOUT_S`` drops the connection, which catches a
stopped or unreachable host), and a socket monitor turns a dropped connection (a killed server is seen at
once) into ``FrontDoorError`` status 503 for every waiting call; a server that cannot be reached at all
is an error after ``connect_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterator

import msgspec
import zmq
import zmq.asyncio

from radixlm.runtime.protocol import (
    ClientAbort,
    ClientChunk,
    ClientCommand,
    ClientError,
    ClientGenerate,
    decode_front_door_reply,
    encode,
)


class FrontDoorError(RuntimeError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _body(body: dict | None, fields: dict[str, Any], stream: bool | None) -> dict:
    out = dict(body or {})
    out.update(fields)
    if stream is not None:
        out["stream"] = stream
    return out


HEARTBEAT_IVL_S = 1.0
HEARTBEAT_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0


def _liveness_options(s: zmq.Socket) -> None:
    s.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_S * 1000))
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_S * 1000))
    s.setsockopt(zmq.HEARTBEAT_TTL, int(HEARTBEAT_TIMEOUT_S * 1000))


class _Conn:
    """One thread's DEALER socket and what its monitor says about the connection."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        _liveness_options(self.sock)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        self.sock.connect(address)
        self.created = time.monotonic()
        self.connected = False
        self.lost = False  # the connection dropped: calls in flight are lost, new ones reconnect

    def events(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            ev = recv_monitor_message(self.monitor)["event"]
            if ev in (zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED):
                self.connected, self.lost = True, False
            elif ev == zmq.EVENT_DISCONNECTED:
                self.connected, self.lost = False, True

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(0)


class FrontDoorClient:
    def __init__(self, address: str, api_key: str | None = None, timeout: float | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        """``timeout``: seconds to wait for each reply (None: as long as the server is alive and
        connected; a dead or unreachable server is an error within seconds either way)."""
        self.address = address
        self.api_key = api_key
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._sockets: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ sockets
    def _sock(self) -> zmq.Socket:
        if self._closed:
            raise FrontDoorError("client is closed")
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.events()
            if c.lost:  # start the next call on a fresh connection (nothing stale in its queue)
                with self._lock:
                    self._sockets.remove(c)
                c.close()
                c = None
        if c is None:
            c = _Conn(self._ctx, self.address)
            self._local.conn = c
            with self._lock:
                self._sockets.append(c)
        return c.sock

    def _recv(self, sock: zmq.Socket, req_id: str) -> ClientChunk:
        conn: _Conn = self._local.conn
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            wait_ms = 250  # wake up to look at the connection's state
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply from {self.address} within {self.timeout} s")
                wait_ms = min(wait_ms, int(left * 1000) + 1)
            if not sock.poll(wait_ms):
                conn.events()
                if conn.lost:
                    raise FrontDoorError(f"the connection to the server at {self.address} was lost", 503)
                if not conn.connected and time.monotonic() - conn.created > self.connect_timeout:
                    raise FrontDoorError(f"cannot reach the server at {self.address} "
                                         f"(no connection within {self.connect_timeout:g} s)", 503)
                continue
            try:
                msg = decode_front_door_reply(sock.recv())
            except msgspec.DecodeError as e:
                raise FrontDoorError(f"malformed reply: {e}", 500) from None
            if isinstance(msg, ClientError):
                if msg.req_id in (req_id, ""):
                    raise FrontDoorError(msg.message, msg.status)
                continue
            if msg.req_id == req_id:
                return msg
            # else: a late chunk of a request this thread abandoned earlier

    # ------------------------------------------------------------------ API
    def generate(self, body: dict | None = None, **fields: Any) -> dict | list[dict]:
        """Run a /generate body to completion; returns a dict (single) or a list (batch / n > 1)."""
        req_id = uuid.uuid4().hex
        sock = self._sock()
        sock.send(encode(ClientGenerate(req_id=req_id, body=_body(body, fields, False), api_key=self.api_key)))
        try:
            return self._recv(sock, req_id).data
        except BaseException:
            self._abort(sock, req_id)
            raise

    def generate_stream(self, body: dict | None = None, **fields: Any) -> Iterator[dict]:
        """Yield SGLang stream chunks (cumulative text; ``index`` for batches). Breaking out aborts."""
        req_id = uuid.uuid4().hex
        sock = self._sock()
        sock.send(encode(ClientGenerate(req_id=req_id, body=_body(body, fields, True), api_key=self.api_key)))
        done = False
        try:
            while True:
                msg = self._recv(sock, req_id)
                if msg.finished:
                    done = True
                    return
                yield msg.data
        finally:
            if not done:
                self._abort(sock, req_id)

    def _abort(self, sock: zmq.Socket, req_id: str) -> None:
        try:
            sock.send(encode(ClientAbort(req_id=req_id, api_key=self.api_key)), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def command(self, name: str) -> Any:
        req_id = uuid.uuid4().hex
        sock = self._sock()
        sock.send(encode(ClientCommand(req_id=req_id, command=name, api_key=self.api_key)))
        return self._recv(sock, req_id).data

    def get_model_info(self) -> dict:
        return self.command("get_model_info")

    def get_server_info(self) -> dict:
        return self.command("get_server_info")

    def get_model_name(self) -> str:
        """The served model's path, as SGLang's ``Runtime.endpoint.get_model_name()`` gives it."""
        return self.get_model_info()["model_path"]

    def flush_cache(self) -> dict:
        return self.command("flush_cache")

    def health(self) -> bool:
        try:
            return bool(self.command("health"))
        except (FrontDoorError, TimeoutError):
            return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for c in self._sockets:
                c.close()
            self._sockets.clear()
        self._ctx.term()

    def __enter__(self) -> "FrontDoorClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncFrontDoorClient:
    """One DEALER for one event loop; a reader task routes replies to their request's queue."""

    def __init__(self, address: str, api_key: str | None = None, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.address = address
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        _liveness_options(self._sock)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sock.connect(address)
        self._created = time.monotonic()
        self._connected = False
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    def _ensure_reader(self) -> None:
        if self._reader is None:
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read())
            self._watcher = loop.create_task(self._watch())

    def _fail_waiting(self, message: str) -> None:
        for q in self._queues.values():
            q.put_nowait(ClientError(req_id="", message=message, status=503))

    async def _watch(self) -> None:
        """The connection's state from the socket monitor: a drop (heartbeats catch a stopped host, the
        kernel a killed one) fails every waiting call; no connection within connect_timeout too."""
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                frames = await asyncio.wait_for(self._monitor.recv_multipart(), 0.25)
            except asyncio.TimeoutError:
                if (not self._connected and self._queues
                        and time.monotonic() - self._created > self.connect_timeout):
                    self._fail_waiting(f"cannot reach the server at {self.address} "
                                       f"(no connection within {self.connect_timeout:g} s)")
                continue
            ev = parse_monitor_message(frames)["event"]
            if ev == zmq.EVENT_CONNECTED:
                self._connected = True
            elif ev == zmq.EVENT_DISCONNECTED:
                self._connected = False
                self._created = time.monotonic()  # a reconnection gets connect_timeout again
                self._fail_waiting(f"the connection to the server at {self.address} was lost")

    async def _read(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                msg = decode_front_door_reply(data)
            except msgspec.DecodeError:
                continue
            if isinstance(msg, ClientError) and not msg.req_id:
                for q in self._queues.values():
                    q.put_nowait(msg)
                continue
            q = self._queues.get(msg.req_id)
            if q is not None:
                q.put_nowait(msg)

    async def _call(self, msg: msgspec.Struct, req_id: str) -> AsyncIterator[ClientChunk]:
        self._ensure_reader()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req_id] = q
        done = False
        try:
            await self._sock.send(encode(msg))
            while True:
                m = await q.get()
                if isinstance(m, ClientError):
                    done = True
                    raise FrontDoorError(m.message, m.status)
                yield m
                if m.finished:
                    done = True
                    return
        finally:
            self._queues.pop(req_id, None)
            if not done and not self._sock.closed:
                self._sock.send(encode(ClientAbort(req_id=req_id, api_key=self.api_key)), zmq.NOBLOCK)

    async def generate(self, body: dict | None = None, **fields: Any) -> dict | list[dict]:
        req_id = uuid.uuid4().hex
        msg = ClientGenerate(req_id=req_id, body=_body(body, fields, False), api_key=self.api_key)
        async for m in self._call(msg, req_id):
            if m.finished:
                return m.data
        raise FrontDoorError("no answer", 500)

    async def generate_stream(self, body: dict | None = None, **fields: Any) -> AsyncIterator[dict]:
        req_id = uuid.uuid4().hex
        msg = ClientGenerate(req_id=req_id, body=_body(body, fields, True), api_key=self.api_key)
        async for m in self._call(msg, req_id):
            if not m.finished:
                yield m.data

    async def command(self, name: str) -> Any:
        req_id = uuid.uuid4().hex
        async for m in self._call(ClientCommand(req_id=req_id, command=name, api_key=self.api_key), req_id):
            return m.data

    async def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self._sock.close(0)
        self._ctx.term()
