"""The step channel: rank 0 sends each forward pass to the other ranks (msgspec over ZeroMQ).

Rank 0 binds a ROUTER socket; each follower connects a DEALER and announces itself (``TPReady``).
Per forward pass rank 0 sends one ``TPStep`` to every follower: the ForwardBatch's tensors and the
batch's rows of ``req_to_token`` (followers never allocate KV: they write where rank 0 says). Followers
wait here, not inside a collective, while rank 0 idles, so they can notice a dead parent or rank 0.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import zmq

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.memory_pool import ReqToTokenPool
from radixlm.runtime.protocol import TPReady, TPShutdown, TPStep, decode_tp_message, encode

logger = logging.getLogger(__name__)


def _b(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()


def _t(data: bytes, device: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.int64).copy()).to(device)


def encode_step(fb: ForwardBatch, req_to_token: torch.Tensor) -> bytes:
    row_len = max(fb.seq_lens_cpu, default=0)
    rows = req_to_token[fb.req_pool_indices, :row_len] if row_len else req_to_token[:0, :0]
    return encode(TPStep(
        mode=fb.mode.value, input_ids=_b(fb.input_ids), positions=_b(fb.positions),
        out_cache_loc=_b(fb.out_cache_loc), req_pool_indices=_b(fb.req_pool_indices),
        prefix_lens=list(fb.prefix_lens_cpu), extend_lens=list(fb.extend_lens_cpu),
        logits_indices=None if fb.logits_indices is None else _b(fb.logits_indices),
        rows=_b(rows), row_len=row_len,
    ))


def apply_step(step: TPStep, req_to_token_pool: ReqToTokenPool, device: str) -> ForwardBatch:
    """Rebuild rank 0's ForwardBatch here and copy its req_to_token rows into this rank's table."""
    rows_idx = _t(step.req_pool_indices, device)
    fb = ForwardBatch.build(
        ForwardMode(step.mode), _t(step.input_ids, "cpu").tolist(), _t(step.positions, "cpu").tolist(),
        _t(step.out_cache_loc, device), rows_idx.tolist(), step.prefix_lens, step.extend_lens, device,
    )
    if step.logits_indices is not None:
        fb.logits_indices = _t(step.logits_indices, device)
    if step.row_len:
        rows = _t(step.rows, device).view(len(step.prefix_lens), step.row_len)
        req_to_token_pool.req_to_token[rows_idx, : step.row_len] = rows
    return fb


class StepLeader:
    """Rank 0's end: bind a free port, wait for every follower, then send each step to all of them."""

    def __init__(self, host: str, preferred_port: int):
        self._ctx = zmq.Context(1)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished follower raises
        # rank 0's own host (from --dist-init-addr), so other nodes can reach it; the rendezvous port + 1
        # (predictable, for firewalls) unless something else holds it. Followers learn the port by broadcast.
        try:
            self._sock.bind(f"tcp://{host}:{preferred_port}")
            self.port = preferred_port
        except zmq.ZMQError:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        self._peers: list[bytes] = []

    def wait_for_followers(self, num_followers: int, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self._peers) < num_followers:
            if not self._sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                raise TimeoutError(f"{num_followers - len(self._peers)} tensor-parallel rank(s) did not connect")
            ident, data = self._sock.recv_multipart()
            msg = decode_tp_message(data)
            if isinstance(msg, TPReady) and ident not in self._peers:
                self._peers.append(ident)

    def send(self, data: bytes) -> None:
        for ident in self._peers:
            self._sock.send_multipart([ident, data])

    def send_step(self, fb: ForwardBatch, req_to_token: torch.Tensor) -> None:
        self.send(encode_step(fb, req_to_token))

    def close(self) -> None:
        try:
            self.send(encode(TPShutdown()))
        except zmq.ZMQError:
            pass  # a follower already gone
        self._sock.close(0)
        self._ctx.term()


class StepFollower:
    """A follower's end: announce, then receive steps."""

    def __init__(self, address: str, rank: int):
        self._ctx = zmq.Context(1)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IDENTITY, f"rank{rank}".encode())
        self._sock.connect(address)
        self._sock.send(encode(TPReady(rank=rank)))

    def recv(self, timeout_ms: int) -> TPStep | TPShutdown | None:
        """The next message, or None after ``timeout_ms`` without one."""
        if not self._sock.poll(timeout_ms):
            return None
        msg = decode_tp_message(self._sock.recv())
        if not isinstance(msg, (TPStep, TPShutdown)):
            raise ValueError(f"unexpected {type(msg).__name__} on the step channel")
        return msg

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()
