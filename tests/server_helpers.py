"""Helpers shared by the server tests (live servers on the tiny model)."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any, Callable

import requests


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``pred`` until truthy; returns its value, or the last (falsy) value after ``timeout``."""
    deadline = time.monotonic() + timeout
    value = pred()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = pred()
    return value


def stats(url: str, headers: dict | None = None) -> dict:
    return requests.get(url + "/get_server_info", headers=headers or {}, timeout=30).json()["scheduler_stats"]


def check_kv_invariant(url: str, headers: dict | None = None) -> dict:
    """free + evictable + protected == total, nothing locked or running (the server must be idle)."""
    s = wait_until(lambda: (lambda st: st if st["num_running_reqs"] == 0 and st["num_waiting_reqs"] == 0
                            and st["protected_tokens"] == 0 else None)(stats(url, headers)), timeout=10)
    assert s, f"server did not become idle: {stats(url, headers)}"
    assert s["free_tokens"] + s["evictable_tokens"] + s["protected_tokens"] == s["max_total_tokens"], s
    return s


def start_cli_server(model: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """``radixlm serve`` as a child process on a free port (CPU, quiet logs); waits until /health is 200."""
    from radixlm.runtime.child_process import child_env, python_command
    from radixlm.runtime.server.ipc import free_port

    port = free_port()
    cmd = python_command("radixlm.runtime.cli", "serve", "--model-path", model, "--device", "cpu",
                         "--port", str(port), "--max-total-tokens", "8192", "--log-level", "warning",
                         "--log-interval-s", "0", *extra)
    proc = subprocess.Popen(cmd, env=child_env())
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, "server exited while starting"
        try:
            return requests.get(url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    assert wait_until(healthy, timeout=300, interval=0.25)
    return proc, url
