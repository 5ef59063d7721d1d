"""The detokenizer process: token ids → text, one ``RequestState`` per running request.

The text logic (incremental, UTF-8 safe decoding; stop strings trimmed and, while streaming, held
back) lives in ``radixlm.runtime.request_state.RequestState`` — the same object the in-process Engine
uses — and runs here, off the tokenizer manager's event loop. The tokenizer manager registers each
request (``DetokRegister``) before sending it to the scheduler; if a scheduler output overtakes its
registration (they travel on different sockets), it waits in ``pending`` until the registration
arrives.

What goes to the tokenizer manager per request and step (``DetokOut.data``):
  * streaming request: a *delta* (``RequestState.delta``) — ``{"text": new text, "output_ids": new ids,
    "meta_info": {counts, finish_reason, new logprob entries}}``; the tokenizer manager accumulates it into SGLang's
    cumulative stream chunks or OpenAI deltas, so no step re-sends the whole text;
  * non-streaming request: nothing until it finishes, then ``RequestState.result()``.
Other scheduler messages (stats, flush replies, errors, ready) are forwarded unchanged.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import zmq

from radixlm.runtime.protocol import (
    BatchOut,
    DetokBatchOut,
    DetokOut,
    DetokRegister,
    ErrorOut,
    ReqOutput,
    StatsOut,
    decode_detokenizer_input,
    encode,
)
from radixlm.runtime.server.ipc import IpcNames, ParentGone, parent_alive, send_while_parent_alive, setup_child_process
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger("radixlm.detokenizer")


def run_detokenizer_process(server_args: ServerArgs, ipc: IpcNames, parent_pid: int) -> None:
    """Entry point of the spawned process."""
    setup_child_process("detokenizer", server_args.log_level)
    from radixlm.runtime.hf_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(server_args.tokenizer_path or server_args.model_path)
    ctx = zmq.Context(1)
    recv = ctx.socket(zmq.PULL)
    recv.bind(ipc.detokenizer)
    send = ctx.socket(zmq.PUSH)
    send.connect(ipc.tokenizer)
    detok = DetokenizerManager(tokenizer)
    try:
        while True:
            if not recv.poll(500):
                if not parent_alive(parent_pid):
                    logger.warning("parent process is gone; detokenizer exiting")
                    return
                continue
            data = recv.recv()
            out = detok.handle_bytes(data)
            if out is not None:
                send_while_parent_alive(send, out, parent_pid)
    except ParentGone:
        logger.warning("parent process is gone; detokenizer exiting")
    except Exception:
        logger.exception("detokenizer crashed")
        sys.exit(1)
    finally:
        recv.close(0)
        send.close(0)
        ctx.term()


class DetokenizerManager:
    """Socket-free core of the detokenizer process (unit-testable): bytes in, bytes out."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.states: dict[str, Any] = {}  # rid → RequestState
        self.pending: dict[str, list[ReqOutput]] = {}  # outputs that overtook their registration

    def handle_bytes(self, data: bytes) -> bytes | None:
        try:
            msg = decode_detokenizer_input(data)
        except (msgspec.DecodeError, RecursionError) as e:
            logger.warning("malformed message on the detokenizer socket: %s", e)
            return encode(ErrorOut(message=f"detokenizer: malformed message: {e}"))
        if isinstance(msg, DetokRegister):
            outs = self.register(msg)
            return encode(DetokBatchOut(outputs=outs)) if outs else None
        if isinstance(msg, BatchOut):
            outs = self.process(msg.outputs)
            return encode(DetokBatchOut(outputs=outs)) if outs else None
        if isinstance(msg, ErrorOut) and msg.rid:
            self.states.pop(msg.rid, None)
            self.pending.pop(msg.rid, None)
        if isinstance(msg, StatsOut):  # the scheduler's stats, plus what this process still tracks
            msg.stats["detokenizer_states"] = len(self.states)
            msg.stats["detokenizer_pending"] = len(self.pending)
            return encode(msg)
        return data  # forwarded unchanged: the tokenizer manager decodes the same Struct

    def register(self, msg: DetokRegister) -> list[DetokOut]:
        from radixlm.runtime.request_state import RequestState

        rid = msg.req.rid
        self.states[rid] = RequestState(msg.req, self.tokenizer)
        early = self.pending.pop(rid, None)
        return self.process(early) if early else []

    def process(self, outputs: list[ReqOutput]) -> list[DetokOut]:
        result: list[DetokOut] = []
        for out in outputs:
            state = self.states.get(out.rid)
            if state is None:
                self.pending.setdefault(out.rid, []).append(out)
                continue
            sent = len(state.stream_text()) if state.req.stream else 0
            state.update(out)
            n_new = len(out.new_token_ids)
            if out.finished:
                del self.states[out.rid]
            if state.req.stream:
                data: dict | None = state.delta(out, sent)
            else:
                data = state.result() if out.finished else None
            result.append(DetokOut(rid=out.rid, num_new_tokens=n_new, finished=out.finished, data=data))
        return result
