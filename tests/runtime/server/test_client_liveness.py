"""ZeroMQ clients never wait on a dead server (no model needed: a bare ROUTER plays the server).

A server that goes away while a call waits (its socket closes, as when the process is killed) fails the
call with status 503; an address nobody serves fails after ``connect_timeout``. Both clients."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq

from radixlm.runtime.server.client import AsyncFrontDoorClient, FrontDoorClient, FrontDoorError
from radixlm.runtime.server.ipc import free_port


class _VanishingServer:
    """Accepts one message, then closes its socket (a killed server, as the client sees it)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.got = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.sock.poll(30_000):
            self.sock.recv_multipart()
            self.got.set()
            time.sleep(0.3)
        self.sock.close(0)
        self.ctx.term()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


def test_sync_client_server_gone_mid_call():
    srv = _VanishingServer()
    with FrontDoorClient(srv.address) as c:  # no timeout: liveness alone must end the wait
        t0 = time.monotonic()
        with pytest.raises(FrontDoorError) as ei:
            c.generate({"text": "x"})
        assert ei.value.status == 503 and "lost" in str(ei.value)
        assert srv.got.is_set() and time.monotonic() - t0 < 5


def test_sync_client_nobody_listening():
    with FrontDoorClient(f"tcp://127.0.0.1:{free_port()}", connect_timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(FrontDoorError) as ei:
            c.generate({"text": "x"})
        assert ei.value.status == 503 and "cannot reach" in str(ei.value)
        assert time.monotonic() - t0 < 5


def test_async_client_server_gone_and_nobody_listening():
    async def run() -> None:
        srv = _VanishingServer()
        c = AsyncFrontDoorClient(srv.address)
        try:
            with pytest.raises(FrontDoorError) as ei:
                await asyncio.wait_for(c.generate({"text": "x"}), 10)
            assert ei.value.status == 503 and "lost" in str(ei.value)
        finally:
            await c.close()
        c = AsyncFrontDoorClient(f"tcp://127.0.0.1:{free_port()}", connect_timeout=0.3)
        try:
            with pytest.raises(FrontDoorError) as ei:
                await asyncio.wait_for(c.generate({"text": "x"}), 10)
            assert ei.value.status == 503 and "cannot reach" in str(ei.value)
        finally:
            await c.close()

    asyncio.run(run())
