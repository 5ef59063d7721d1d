"""What a front door holds while its request runs: a ``RequestHandle`` over the sequences of one
submitted ``GenerateReqInput``, yielding ``GenEvent``s in arrival order; closing it aborts what has
not finished. The ``TokenizerManager`` fills the handles' queues and owns the ``Track`` table.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from radixlm.runtime.protocol import TokenizedGenerateReq
from radixlm.runtime.server.request_errors import RequestError

if TYPE_CHECKING:
    from radixlm.runtime.server.tokenizer_manager import TokenizerManager


@dataclass
class GenEvent:
    """One sequence's progress: ``data`` is a delta for streaming requests, the result once finished
    for non-streaming ones (see detokenizer_process)."""

    index: int  # position in the normalized (batch × n) request list
    data: dict
    finished: bool


@dataclass
class Track:
    """One sequence the tokenizer manager is waiting for (and its latency marks for metrics)."""

    rid: str
    index: int
    queue: asyncio.Queue
    created: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    finished: bool = False


class RequestHandle:
    """The sequences of one submitted GenerateReqInput; async-iterate for GenEvents in arrival order."""

    def __init__(self, tm: TokenizerManager, reqs: list[TokenizedGenerateReq], tracks: list[Track],
                 queue: asyncio.Queue, group: str | None, timeout: float | None = None):
        self.tm = tm
        self.reqs = reqs
        self._tracks = tracks
        self._queue = queue
        self._group = group
        self._remaining = len(reqs)
        self._closed = False
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout

    @property
    def rids(self) -> list[str]:
        return [r.rid for r in self.reqs]

    def __aiter__(self) -> "RequestHandle":
        return self

    async def __anext__(self) -> GenEvent:
        if self._remaining == 0 or self._closed:
            raise StopAsyncIteration
        if self._deadline is None:
            ev = await self._queue.get()
        else:
            try:
                ev = await asyncio.wait_for(self._queue.get(), max(self._deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                self._remaining = 0
                self.close()  # aborts what is still running: its KV is released at the next step
                raise RequestError(f"the request took longer than --request-timeout ({self._timeout:g} s)",
                                   status=504) from None
        if isinstance(ev, BaseException):
            self._remaining = 0
            raise ev
        if ev.finished:
            self._remaining -= 1
            err = (ev.data.get("meta_info") or {}).get("error")
            if err:
                self._remaining = 0
                raise RequestError(str(err))
        return ev

    def close(self) -> None:
        """Abort every sequence that has not finished (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.tm.release(self._tracks, self._group)

    async def __aenter__(self) -> "RequestHandle":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
