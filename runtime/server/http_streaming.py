"""A submitted request's events as an HTTP response: waiting for results while watching for the
client to disconnect (the caller then aborts), starting a stream only after its first event (so an
early error is still a proper 4xx), SSE framing, errors after the headers as an SSE error event, and
SGLang's cumulative ``/generate`` stream.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import Request

from radixlm.runtime.server.request_errors import RequestError
from radixlm.runtime.server.request_handle import GenEvent, RequestHandle


async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (uvicorn blocks until then).
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, coro: Any) -> tuple[bool, Any]:
    """Run ``coro``; (True, None) if the client went away first (the caller then aborts)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return False, task.result()
        task.cancel()
        return True, None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def collect(handle: RequestHandle) -> list[dict]:
    results: list[Any] = [None] * len(handle.reqs)
    async for ev in handle:
        if ev.finished:
            results[ev.index] = ev.data
    return results


async def _first_event(handle: RequestHandle) -> GenEvent | None:
    try:
        return await handle.__anext__()
    except StopAsyncIteration:
        return None


async def start_stream(request: Request, handle: RequestHandle) -> tuple[bool, GenEvent | None]:
    """Wait for the first event before sending headers, so an error the scheduler finds (e.g. the prompt
    can never fit) is still a proper 4xx; abort on disconnect or error."""
    try:
        gone, first = await until_disconnect(request, _first_event(handle))
    except BaseException:
        handle.close()
        raise
    if gone:
        handle.close()
    return gone, first


async def chain(first: GenEvent | None, handle: RequestHandle) -> AsyncIterator[GenEvent]:
    if first is not None:
        yield first
    async for ev in handle:
        yield ev


async def sse_guard(gen: AsyncIterator[str], handle: RequestHandle) -> AsyncIterator[str]:
    """Errors after the headers went out become an SSE error event; closing always aborts the rest."""
    try:
        async for s in gen:
            yield s
    except RequestError as e:
        body = {"error": {"message": str(e), "type": "invalid_request_error" if e.status < 500 else "server_error",
                          "param": e.param, "code": e.status}}
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        handle.close()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def native_stream(events: AsyncIterator[GenEvent], streamers: list, single: bool) -> AsyncIterator[str]:
    """SGLang's /generate stream, one ``NativeStreamer`` per sequence (cumulative or incremental chunks,
    stream_interval; runtime/server/native_stream.py), then [DONE]."""
    async for ev in events:
        chunk = streamers[ev.index].add(ev.data)
        if chunk is None:
            continue
        if not single:
            chunk["index"] = ev.index
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
