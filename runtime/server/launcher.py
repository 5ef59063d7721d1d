"""The server launcher behind `radixlm serve` and `python -m radixlm.runtime.launch_server` (a shim):
start the three processes and HTTP.

Processes (started with multiprocessing "spawn": forking a process that imported torch is unsafe)::

    front process (this one): uvicorn (HTTP) + ZeroMQ front door + TokenizerManager, one asyncio loop
    scheduler process:        Scheduler (model, KV pool, radix cache) in a loop      (scheduler_process)
    detokenizer process:      RequestState per request: token ids → text            (detokenizer_process)

Shutdown: SIGINT or SIGTERM stops uvicorn gracefully, then the children are terminated (killed if they
linger) and the private IPC directory is removed. Children also exit on their own when this process
disappears. If a child dies, every waiting client gets an error and the server exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable

import uvicorn

from radixlm.runtime.child_process import isolate_sys_path
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.sglang_flags import add_ignored_flags, log_ignored_flags

logger = logging.getLogger("radixlm.server")


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM, so that every ``finally`` runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radixlm serve", description="Serve a model over HTTP (OpenAI-compatible and SGLang native) and ZeroMQ."
    )
    ServerArgs.add_cli_args(parser)
    add_ignored_flags(parser)  # SGLang's flags that do not apply here: accepted, noted in the log
    return parser


def main(argv: list[str] | None = None) -> None:
    isolate_sys_path()
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        server_args = ServerArgs.from_cli_args(args)
    except ValueError as e:
        print(f"radixlm serve: error: {e}", file=sys.stderr)
        sys.exit(2)
    from radixlm.runtime.server.ipc import configure_logging

    configure_logging(server_args.log_level)
    log_ignored_flags(args)
    sys.exit(launch_server(server_args))


def launch_server(server_args: ServerArgs) -> int:
    """Run the server until SIGINT/SIGTERM (→ 0) or a child process dies (→ 1). Blocks."""
    from radixlm.runtime.server.ipc import IpcNames, configure_logging

    from radixlm.runtime.prompt_format import load_chat_template

    configure_logging(server_args.log_level)
    if server_args.node_rank > 0:  # another machine's share of the tensor-parallel ranks: no HTTP here
        from radixlm.runtime.distributed.worker import serve_node

        return serve_node(server_args)
    if server_args.dp_size > 1:
        from radixlm.runtime.distributed.data_parallel import launch_data_parallel

        return launch_data_parallel(server_args)
    from radixlm.runtime.distributed.worker import with_dist_addr

    server_args = with_dist_addr(server_args)
    try:
        chat_template = load_chat_template(server_args.chat_template)
    except (OSError, ValueError, KeyError) as e:
        logger.error("--chat-template: %s", e)
        return 2
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    ipc = IpcNames.create()
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        procs = _start_children(server_args, ipc)
        return asyncio.run(_serve(server_args, ipc, procs, chat_template))
    except (KeyboardInterrupt, _Terminated):
        logger.info("shutting down")
        return 0
    finally:
        _stop_children(procs)
        ipc.remove()
        signal.signal(signal.SIGTERM, previous)


def _start_children(server_args: ServerArgs, ipc: Any) -> list:
    from radixlm.runtime.server.detokenizer_process import run_detokenizer_process
    from radixlm.runtime.server.scheduler_process import run_scheduler_process

    mp = multiprocessing.get_context("spawn")
    me = os.getpid()
    procs = [
        mp.Process(target=run_scheduler_process, args=(server_args, ipc, me), name="radixlm-scheduler", daemon=True),
        mp.Process(target=run_detokenizer_process, args=(server_args, ipc, me), name="radixlm-detokenizer", daemon=True),
    ]
    for p in procs:
        p.start()
    if server_args.tp_size > 1:  # this node's other tensor-parallel ranks, watched like the others
        from radixlm.runtime.distributed.worker import start_followers

        procs += start_followers(server_args)
    return procs


def _stop_children(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            logger.warning("%s did not exit on SIGTERM; killing it", p.name)
            p.kill()
            p.join(timeout=5)


async def _serve(server_args: ServerArgs, ipc: Any, procs: list, chat_template: str | None) -> int:
    from radixlm.runtime.server.http_server import ServerContext, create_app
    from radixlm.runtime.server.metrics import ServerMetrics
    from radixlm.runtime.server.openai_tools import ChatConfig
    from radixlm.runtime.server.request_errors import RequestError
    from radixlm.runtime.server.tokenizer_manager import TokenizerManager
    from radixlm.runtime.server.zmq_frontdoor import FrontDoor
    from radixlm.runtime.hf_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(server_args.tokenizer_path or server_args.model_path)
    metrics = ServerMetrics(server_args.model_id)
    tm = TokenizerManager(server_args, ipc, tokenizer, metrics)
    await tm.start()
    for p in procs:
        tm.watch_process(p, p.name.removeprefix("radixlm-"))
    frontdoor: FrontDoor | None = None
    try:
        try:
            await tm.wait_ready()
        except RequestError as e:
            logger.error("the server failed to start: %s", e)
            return 1
        chat = ChatConfig.build(chat_template or getattr(tokenizer, "chat_template", None),
                                server_args.tool_call_parser, server_args.reasoning_parser,
                                server_args.constrained_json_whitespace_pattern)
        ctx = ServerContext(args=server_args, tm=tm, metrics=metrics, chat_template=chat_template, chat=chat,
                            pids={"tokenizer_manager": os.getpid(), "detokenizer": procs[1].pid,
                                  **{p.name.removeprefix("radixlm-"): p.pid for p in procs[2:]}})
        frontdoor = FrontDoor(
            tm, server_args.host, server_args.api_key, server_args.max_request_body_bytes,
            commands={
                "get_model_info": _as_async(ctx.model_info),
                "get_server_info": ctx.server_info,
                "flush_cache": lambda: _flush(tm),
                "health": _as_async(lambda: tm.is_alive),
            },
        )
        ctx.frontdoor_address = frontdoor.address
        await frontdoor.start()
        config = uvicorn.Config(
            create_app(ctx), host=server_args.host, port=server_args.port, log_level=_uvicorn_log_level(server_args.log_level),
            access_log=server_args.log_level.lower() == "debug", timeout_keep_alive=5, timeout_graceful_shutdown=3,
            lifespan="off",
        )
        server = _Server(config, before_shutdown=tm.shutting_down)
        exit_code = 0

        def on_dead(reason: str) -> None:
            nonlocal exit_code
            exit_code = 1
            # A moment for the error responses to reach their clients, then stop serving.
            asyncio.get_running_loop().call_later(1.0, setattr, server, "should_exit", True)

        tm.on_dead.append(on_dead)
        logger.info("ZeroMQ front door at %s", frontdoor.address)
        logger.info("The server is fired up and ready to roll! http://%s:%d", server_args.host, server_args.port)
        await server.serve()
        return exit_code if server.started else 1
    finally:
        if frontdoor is not None:
            await frontdoor.close()
        await tm.close()


def _uvicorn_log_level(level: str) -> str:
    """uvicorn's own lines (process started, running on, shutting down) repeat ours: debug only."""
    return "debug" if level.lower() == "debug" else max(level.lower(), "warning", key=_LEVELS.index)


_LEVELS = ["debug", "info", "warning", "error", "critical"]


class _Server(uvicorn.Server):
    """uvicorn.Server that ends running requests before waiting for connections to close."""

    def __init__(self, config: uvicorn.Config, before_shutdown: Callable[[], None]):
        super().__init__(config)
        self._before_shutdown = before_shutdown

    async def shutdown(self, sockets: Any = None) -> None:
        self._before_shutdown()
        await super().shutdown(sockets)


def _as_async(fn: Any) -> Any:
    async def call() -> Any:
        return fn()

    return call


async def _flush(tm: Any) -> dict:
    out = await tm.flush_cache()
    return {"success": out.success, "message": out.message}
