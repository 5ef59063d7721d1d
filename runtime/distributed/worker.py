"""Tensor-parallel follower ranks: how they are started and the loop they run.

A follower builds a ModelRunner for its rank (process group, sharded model, its own KV pool), then
repeats: receive rank 0's step, run the same forward pass (taking part in the all-reduces and the logits
gather). It exits on ``TPShutdown``, when rank 0's channel or a collective fails, or when the process
that started it is gone. ``radixlm serve --node-rank K`` (K > 0) runs only followers (``serve_node``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys

from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger("radixlm.tp")

_POLL_MS = 500


def local_ranks(args: ServerArgs) -> range:
    """Global tensor-parallel ranks that run on this node."""
    per_node = args.tp_size // args.nnodes
    return range(args.node_rank * per_node, (args.node_rank + 1) * per_node)


def with_dist_addr(args: ServerArgs) -> ServerArgs:
    """Fill ``dist_init_addr`` on one node (two free loopback ports: the rendezvous and the step channel)."""
    if args.tp_size == 1 or args.dist_init_addr:
        return args
    from radixlm.runtime.server.ipc import free_port

    while True:
        port = free_port()
        if port < 65535 and _port_free(port + 1):
            return args.replace(dist_init_addr=f"127.0.0.1:{port}")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_followers(args: ServerArgs) -> list[multiprocessing.process.BaseProcess]:
    """Spawn this node's follower ranks (every local rank but global rank 0). ``args`` has its dist addr."""
    mp = multiprocessing.get_context("spawn")
    procs = []
    for rank in local_ranks(args):
        if rank == 0:
            continue
        p = mp.Process(target=run_follower_process, args=(args, rank, os.getpid()),
                       name=f"radixlm-tp{rank}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def run_follower_process(args: ServerArgs, rank: int, parent_pid: int) -> None:
    """Entry point of a spawned follower rank."""
    from radixlm.runtime.child_process import isolate_sys_path
    from radixlm.runtime.server.ipc import setup_child_process

    isolate_sys_path()
    setup_child_process(f"tp{rank}", args.log_level)
    _limit_threads(args)
    try:
        follow(args, rank, parent_pid)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        sys.exit(1)


def follow(args: ServerArgs, rank: int, parent_pid: int | None) -> None:
    from radixlm.runtime.distributed.step_channel import StepFollower, apply_step
    from radixlm.runtime.model_runner import ModelRunner
    from radixlm.runtime.protocol import TPShutdown
    from radixlm.runtime.server.ipc import parent_alive

    runner = ModelRunner(args, tp_rank=rank)
    channel = StepFollower(runner.step_channel_addr, rank)
    logger.info("tensor-parallel rank %d ready", rank)
    try:
        while True:
            msg = channel.recv(_POLL_MS)
            if msg is None:
                if parent_pid is not None and not parent_alive(parent_pid):
                    logger.warning("parent process is gone; rank %d exiting", rank)
                    return
                continue
            if isinstance(msg, TPShutdown):
                return
            runner.forward(apply_step(msg, runner.req_to_token_pool, runner.device))
    finally:
        channel.close()
        runner.close()


def _limit_threads(args: ServerArgs) -> None:
    """On the CPU, ranks of one node share its cores (an explicit OMP_NUM_THREADS wins)."""
    if "OMP_NUM_THREADS" in os.environ or args.resolved_device != "cpu":
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // len(local_ranks(args))))


def serve_node(args: ServerArgs) -> int:
    """``radixlm serve --node-rank K`` for K > 0: run this node's ranks until they exit."""
    procs = start_followers(args)
    code = 0
    try:
        for p in procs:
            p.join()
            code = code or (p.exitcode or 0)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    return code
