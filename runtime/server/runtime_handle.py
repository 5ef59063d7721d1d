"""``radixlm.Runtime``: launch a local server from Python and talk to it.

    with Runtime(model_path=DIR, max_total_tokens=4096) as rt:
        rt.url        # http://127.0.0.1:PORT  (OpenAI-compatible and SGLang native HTTP)
        rt.endpoint   # FrontDoorClient on the ZeroMQ front door (what DSL backends use)

The server runs as ``python -m radixlm.runtime.launch_server`` in a child process (which spawns the
scheduler and detokenizer), so the caller's process never imports torch for it. ``shutdown()`` sends
SIGTERM and waits; it also runs at interpreter exit.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import subprocess
import sys
import time
from typing import Any

import requests

from radixlm.runtime.child_process import child_env, python_command
from radixlm.runtime.server.client import FrontDoorClient
from radixlm.runtime.server.ipc import free_port
from radixlm.runtime.server_args import ServerArgs


def server_args_to_argv(args: ServerArgs) -> list[str]:
    """The CLI flags that rebuild ``args`` (only fields that differ from their defaults)."""
    argv: list[str] = []
    for f in dataclasses.fields(ServerArgs):
        value = getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name != "model_path" and value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


class RuntimeLaunchError(RuntimeError):
    pass


class Runtime:
    def __init__(self, model_path: str | None = None, *, launch_timeout: float = 600.0, **kwargs: Any):
        """``kwargs``: any ServerArgs field (``max_total_tokens``, ``device``, ``api_key``, ``port``, ...).
        A free port is chosen unless ``port`` is given."""
        if model_path is not None:
            kwargs["model_path"] = model_path
        kwargs.setdefault("port", free_port(kwargs.get("host", "127.0.0.1")))
        self.server_args = ServerArgs.from_kwargs(**kwargs)
        a = self.server_args
        host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host
        self.url = f"http://{host}:{a.port}"
        self.api_key = a.api_key
        self._endpoint: FrontDoorClient | None = None
        cmd = python_command("radixlm.runtime.launch_server", *server_args_to_argv(a))
        self.process = subprocess.Popen(cmd, env=child_env(TOKENIZERS_PARALLELISM="false"))
        atexit.register(self.shutdown)
        try:
            self._wait_healthy(launch_timeout)
            self.server_info = self.get("/get_server_info")
        except BaseException:
            self.shutdown()
            raise
        # A data-parallel server's front door is the router, which has no ZeroMQ door (DSL clients use HTTP).
        self.zmq_address: str | None = self.server_info.get("zmq_frontdoor")

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def endpoint(self) -> FrontDoorClient:
        """A client of the ZeroMQ front door (created on first use). A data-parallel server has none
        (AttributeError, so ``getattr(rt, "endpoint", None)`` and DSL backends fall back to HTTP)."""
        if self.zmq_address is None:
            raise AttributeError("this server publishes no ZeroMQ front door (data-parallel: use its url over HTTP)")
        if self._endpoint is None:
            self._endpoint = FrontDoorClient(self.zmq_address, api_key=self.api_key)
        return self._endpoint

    def get(self, path: str) -> Any:
        r = requests.get(self.url + path, headers=self.headers, timeout=60)
        r.raise_for_status()
        return r.json()

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeLaunchError(f"the server exited with status {code} while starting (see its log above)")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise RuntimeLaunchError(f"the server did not become healthy within {timeout} s")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the server and its children (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()  # the children notice their parent is gone and exit
                self.process.wait()
        atexit.unregister(self.shutdown)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"Runtime(url={self.url!r}, zmq={getattr(self, 'zmq_address', None)!r})"
