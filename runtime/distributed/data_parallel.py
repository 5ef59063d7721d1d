"""``radixlm serve --dp-size N``: N replicas of the server behind one front door, routed cache-aware.

Each replica is a whole server (scheduler, KV pool, radix tree, detokenizer; ``--tp-size`` ranks of
its own, on GPUs ``base_gpu_id + i * tp_size ...``) listening on a private loopback port. This
process is the front door: it runs the router (``radixlm.router``, the same code as ``radixlm
router``, policy ``--load-balance-method``, default ``cache_aware``) on ``--host``/``--port`` in its
own event loop, with the same HTTP API as one server. The replicas are children of this process:
a replica that exits is taken out of the routing at once (its requests in flight fail with an error,
new ones go to the others); when none is left the front door exits with status 1. SIGINT/SIGTERM stop
the router, then every replica.

DSL programs reach it over HTTP (``RuntimeEndpoint`` falls back to ``/generate`` when a server
publishes no ZeroMQ front door), and the router keeps a program's shared prefixes on one replica.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger("radixlm.server")


def replica_args(server_args: ServerArgs, index: int, port: int) -> ServerArgs:
    """Replica ``index``'s settings: one replica, loopback, its own port, devices and rendezvous."""
    return server_args.replace(dp_size=1, host="127.0.0.1", port=port, dist_init_addr=None,
                               base_gpu_id=server_args.base_gpu_id + index * server_args.tp_size)


def start_replicas(server_args: ServerArgs) -> list:
    """Start every replica (in parallel) and wait until all are healthy; on any failure stop them all."""
    from dataclasses import asdict

    from radixlm.runtime.server.ipc import free_port
    from radixlm.runtime.server.runtime_handle import Runtime

    ports: list[int] = []
    while len(ports) < server_args.dp_size:
        p = free_port()
        if p not in ports and p != server_args.port:
            ports.append(p)
    configs = [replica_args(server_args, i, ports[i]) for i in range(server_args.dp_size)]
    started: list[Any] = []
    with ThreadPoolExecutor(len(configs)) as pool:
        futures = [pool.submit(lambda a: Runtime(**asdict(a)), a) for a in configs]
        errors = []
        for f in futures:
            try:
                started.append(f.result())
            except Exception as e:  # noqa: BLE001 - reported below, after every replica settled
                errors.append(e)
    if errors:
        for rt in started:
            rt.shutdown()
        raise RuntimeError(f"{len(errors)} of {len(configs)} data-parallel replicas failed to start: {errors[0]}")
    return started


class _Terminated(BaseException):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def launch_data_parallel(server_args: ServerArgs) -> int:
    """Run the replicas and the routing front door until SIGINT/SIGTERM (→ 0) or every replica died (→ 1)."""
    from radixlm.router.args import RouterArgs
    from radixlm.router.server import serve_router

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    replicas: list[Any] = []
    try:
        try:
            replicas = start_replicas(server_args)
        except RuntimeError as e:
            logger.error("%s", e)
            return 1
        router_args = RouterArgs(
            worker_urls=tuple(rt.url for rt in replicas), policy=server_args.load_balance_method,
            host=server_args.host, port=server_args.port, api_key=server_args.api_key,
            health_check_interval_s=1.0, log_level=server_args.log_level,
        )
        exit_code = 0

        def on_ready(router: Any, server: Any) -> None:
            async def watch() -> None:
                nonlocal exit_code
                gone: set[str] = set()
                while not server.should_exit:
                    for rt in replicas:
                        code = rt.process.poll()
                        if code is not None and rt.url not in gone:
                            gone.add(rt.url)
                            logger.error("data-parallel replica %s exited with status %s", rt.url, code)
                            w = router.workers.workers.get(rt.url)
                            if w is not None:
                                w.mark_down(f"the replica exited with status {code}")
                    if len(gone) == len(replicas):
                        exit_code = 1
                        server.should_exit = True
                    await asyncio.sleep(0.25)

            router.watch_task = asyncio.ensure_future(watch())

        logger.info("data parallelism: %d replicas at %s", len(replicas), [rt.url for rt in replicas])
        code = asyncio.run(serve_router(router_args, on_ready=on_ready))
        return exit_code or code
    except (KeyboardInterrupt, _Terminated):
        logger.info("shutting down")
        return 0
    finally:
        for rt in replicas:
            rt.shutdown()
        signal.signal(signal.SIGTERM, previous)
