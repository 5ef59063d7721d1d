"""The scheduler process: a loop around the socket-free ``Scheduler``.

Each turn: take every message waiting on the input socket (validated msgpack; a malformed one is
answered with an ErrorOut and otherwise ignored), hand it to ``scheduler.handle``, then run one
``scheduler.step()`` while there is work and push the outputs to the detokenizer. When idle it blocks
on the socket (with a timeout, to notice a dead parent and to write the periodic log line).

An exception inside ``step()`` leaves the KV state unknown, so it is fatal: the process logs it and
exits, and the tokenizer manager fails every waiting client and shuts the server down.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import msgspec
import zmq

from radixlm.runtime.protocol import (
    BatchOut,
    ErrorOut,
    HeartbeatOut,
    ReadyOut,
    decode_scheduler_input,
    encode,
)
from radixlm.runtime.server.ipc import IpcNames, ParentGone, parent_alive, send_while_parent_alive, setup_child_process
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger("radixlm.scheduler")

_IDLE_POLL_MS = 500
HEARTBEAT_INTERVAL_S = 1.0


def run_scheduler_process(server_args: ServerArgs, ipc: IpcNames, parent_pid: int) -> None:
    """Entry point of the spawned process."""
    setup_child_process("scheduler", server_args.log_level)
    ctx = zmq.Context(1)
    recv = ctx.socket(zmq.PULL)
    recv.bind(ipc.scheduler)
    send = ctx.socket(zmq.PUSH)
    send.connect(ipc.detokenizer)
    try:
        _set_cpu_threads(server_args)
        from radixlm.runtime.scheduler import Scheduler

        scheduler = Scheduler(server_args)
    except Exception:
        logger.exception("scheduler failed to start")
        sys.exit(1)
    send.send(encode(ReadyOut(model_info=_plain(scheduler.model_info), pid=os.getpid())))
    logger.debug("scheduler ready: %s", scheduler.model_info)
    try:
        SchedulerLoop(scheduler, recv, send, server_args, parent_pid).run()
    except ParentGone:
        logger.warning("parent process is gone; scheduler exiting")
    except Exception:
        logger.exception("scheduler crashed")
        sys.exit(1)
    finally:
        scheduler.close()
        recv.close(0)
        send.close(0)
        ctx.term()


class SchedulerLoop:
    def __init__(self, scheduler, recv: zmq.Socket, send: zmq.Socket, server_args: ServerArgs, parent_pid: int):
        self.scheduler = scheduler
        self.recv = recv
        self.send = send
        self.parent_pid = parent_pid
        self.log_interval_s = server_args.log_interval_s
        self._last_log = time.monotonic()
        self._last_check = time.monotonic()
        self._last_heartbeat = 0.0
        self._steps_since_log = 0

    def run(self) -> None:
        while True:
            busy = self.scheduler.has_work()
            if self.recv.poll(0 if busy else _IDLE_POLL_MS):
                self._drain()
            if self.scheduler.has_work():
                outputs = self.scheduler.step()
                self._steps_since_log += 1
                if outputs:
                    self._send(encode(BatchOut(outputs=outputs)))
            now = time.monotonic()
            if now - self._last_heartbeat >= HEARTBEAT_INTERVAL_S:
                self._last_heartbeat = now
                sched = self.scheduler
                self._send(encode(HeartbeatOut(step_count=sched.step_count, num_running=len(sched.running),
                                               num_waiting=len(sched.waiting))))
            if now - self._last_check >= 0.5:
                self._last_check = now
                if not parent_alive(self.parent_pid):
                    logger.warning("parent process is gone; scheduler exiting")
                    return
            if self.log_interval_s > 0 and now - self._last_log >= self.log_interval_s:
                self._log_stats(now)

    def _send(self, data: bytes) -> None:
        send_while_parent_alive(self.send, data, self.parent_pid)

    def _drain(self) -> None:
        while True:
            try:
                data = self.recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            for out in self._handle_bytes(data):
                self._send(encode(out))

    def _handle_bytes(self, data: bytes) -> list:
        try:
            msg = decode_scheduler_input(data)
        except (msgspec.DecodeError, RecursionError) as e:
            logger.warning("malformed message on the scheduler socket (%d bytes): %s", len(data), e)
            return [ErrorOut(message=f"malformed message: {e}")]
        try:
            return self.scheduler.handle(msg)
        except Exception as e:  # noqa: BLE001 - one bad message must not take the server down
            logger.exception("scheduler.handle failed for %s", type(msg).__name__)
            return [ErrorOut(rid=getattr(msg, "rid", ""), message=f"internal error: {type(e).__name__}: {e}")]

    def _log_stats(self, now: float) -> None:
        """SGLang-style periodic line; silent while nothing happens."""
        self._last_log = now
        s = self.scheduler.get_stats()
        if not self._steps_since_log and not s.get("num_running_reqs") and not s.get("num_waiting_reqs"):
            return
        self._steps_since_log = 0
        used = s.get("max_total_tokens", 0) - s.get("free_tokens", 0) - s.get("evictable_tokens", 0)
        logger.info(
            "#running-req: %d, #queue-req: %d, #token: %d, token usage: %.2f, cache hit rate: %.2f%%, "
            "gen throughput (token/s): %.2f",
            s.get("num_running_reqs", 0),
            s.get("num_waiting_reqs", 0),
            used,
            s.get("token_usage", 0.0),
            100.0 * s.get("cache_hit_rate", 0.0),
            s.get("gen_throughput", 0.0),
        )


def _set_cpu_threads(server_args: ServerArgs) -> None:
    """On CPU, torch gets every core of the process's affinity mask (an explicit OMP_NUM_THREADS wins).

    The front processes sleep on their sockets between chunks, so they cost the forward pass little.
    Measured on 2 cores (benchmarks/bench_serving_vllm.py, 64 streamed requests, llama-small): 2 torch
    threads against 1 gave 298 against 190 tok/s with every request at once, and TTFT p50 186 against
    288 ms at 2 req/s. (An early server, whose front processes were busier, ran 10x slower with 2
    threads; it had kept ``cores - 2``.) OpenMP's passive wait policy measured slower (267 tok/s).
    """
    if "OMP_NUM_THREADS" in os.environ or server_args.resolved_device != "cpu":
        return
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    logger.info("CPU device: torch uses %d cores (set OMP_NUM_THREADS to override)", cores)


def _plain(d: dict) -> dict:
    """model_info for the wire: values msgpack can carry (a torch.device becomes its string)."""
    ok = (str, int, float, bool, type(None), list, tuple, dict)
    return {k: (v if isinstance(v, ok) else str(v)) for k, v in d.items()}
