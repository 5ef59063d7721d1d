"""Run the router: ``radixlm router --worker-urls ...`` (``main``), or in a launcher's own event loop
(``serve_router``, used by ``radixlm serve --dp-size``)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any, Callable, Optional

import uvicorn

from radixlm.router.app import Router, create_app
from radixlm.router.args import RouterArgs, from_cli

logger = logging.getLogger("radixlm.router")


async def serve_router(args: RouterArgs, on_ready: Optional[Callable[[Router, uvicorn.Server], Any]] = None) -> int:
    """Serve until the server is told to exit; 0 on a clean stop. ``on_ready`` sees the router and the
    uvicorn server once the workers were checked (a launcher uses it to watch its replicas)."""
    router = Router(args)
    await router.start()
    config = uvicorn.Config(create_app(router), host=args.host, port=args.port, log_level="warning",
                            access_log=args.log_level == "debug", timeout_keep_alive=5,
                            timeout_graceful_shutdown=3, lifespan="off")
    server = uvicorn.Server(config)
    try:
        if on_ready is not None:
            on_ready(router, server)
        healthy = [w.url for w in router.workers.available()]
        logger.info("router (%s) on http://%s:%d over %d worker(s), %d healthy: %s", args.policy, args.host,
                    args.port, len(router.workers.workers), len(healthy), healthy)
        await server.serve()
        return 0 if server.started else 1
    finally:
        await router.close()


def main(argv: list[str]) -> None:
    try:
        args = from_cli(argv)
    except ValueError as e:
        print(f"radixlm router: error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        sys.exit(asyncio.run(serve_router(args)))
    except KeyboardInterrupt:
        sys.exit(0)
