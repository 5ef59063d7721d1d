"""radixlm.runtime.server: the multi-process server (HTTP + ZeroMQ front doors, scheduler, detokenizer).

Start one with ``radixlm serve --model-path DIR`` or from Python with ``Runtime(model_path=DIR)``.
"""

from typing import Any

__all__ = ["Runtime", "FrontDoorClient", "AsyncFrontDoorClient"]


def __getattr__(name: str) -> Any:  # lazy: importing the package must not pull in zmq/requests
    if name == "Runtime":
        from radixlm.runtime.server.runtime_handle import Runtime

        return Runtime
    if name in ("FrontDoorClient", "AsyncFrontDoorClient"):
        from radixlm.runtime.server import client

        return getattr(client, name)
    raise AttributeError(name)
