"""Faults: the scheduler process dies under load. A second live server, started through the CLI
(``radixlm serve``), because this test ends it: every waiting client (HTTP streaming, HTTP
non-streaming, ZeroMQ) must get an error within 5 s, /health must fail, and the server must exit
non-zero leaving no process and no IPC directory behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import requests

from radixlm.runtime.server.client import FrontDoorClient, FrontDoorError
from tests.server_helpers import pid_alive, start_cli_server, stats, wait_until

pytestmark = pytest.mark.slow  # starts servers or subprocesses: not in the fast tier

ERROR_DEADLINE_S = 5.0  # the requirement: clients hear about a dead scheduler within 5 s
LONG = {"max_new_tokens": 2000, "ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def server(tiny_llama):
    proc, url = start_cli_server(tiny_llama)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_scheduler_killed_under_load(server):
    proc, url = server
    info = requests.get(url + "/get_server_info", timeout=30).json()
    pids, ipc_dir = info["pids"], info["ipc_dir"]
    results: dict[str, object] = {}

    def stream_client():
        events = []
        try:
            with httpx.stream("POST", url + "/generate", timeout=60,
                              json={"text": "a", "sampling_params": LONG, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
            results["stream"] = ("events", events[-1] if events else None, time.monotonic())
        except httpx.HTTPError as e:
            results["stream"] = ("exception", repr(e), time.monotonic())

    def plain_client():
        try:
            r = httpx.post(url + "/v1/completions", timeout=60,
                           json={"prompt": "b", "max_tokens": 2000, "ignore_eos": True, "temperature": 0})
            results["plain"] = ("status", (r.status_code, r.json()), time.monotonic())
        except httpx.HTTPError as e:
            results["plain"] = ("exception", repr(e), time.monotonic())

    def zmq_client():
        with FrontDoorClient(info["zmq_frontdoor"], timeout=30) as c:
            try:
                c.generate({"text": "c", "sampling_params": LONG})
                results["zmq"] = ("ok", None, time.monotonic())
            except FrontDoorError as e:
                results["zmq"] = ("error", (e.status, str(e)), time.monotonic())

    threads = [threading.Thread(target=f) for f in (stream_client, plain_client, zmq_client)]
    for t in threads:
        t.start()
    assert wait_until(lambda: stats(url)["num_running_reqs"] == 3, timeout=60), stats(url)
    os.kill(pids["scheduler"], signal.SIGKILL)
    killed = time.monotonic()
    for t in threads:
        t.join(timeout=30)

    kind, detail, at = results["stream"]
    # Either an SSE error event or the connection dropping is an error the client sees.
    assert kind == "exception" or (detail is not None and "error" in detail), results["stream"]
    assert at - killed < ERROR_DEADLINE_S
    kind, detail, at = results["plain"]
    assert kind == "exception" or detail[0] == 503 and "scheduler" in detail[1]["error"]["message"], results["plain"]
    assert at - killed < ERROR_DEADLINE_S
    kind, detail, at = results["zmq"]
    assert kind == "error" and detail[0] == 503, results["zmq"]
    assert at - killed < ERROR_DEADLINE_S

    def health_fails():
        try:
            return requests.get(url + "/health", timeout=2).status_code != 200
        except requests.RequestException:
            return True

    assert health_fails()
    assert proc.wait(timeout=60) == 1  # the server stops itself once the scheduler is gone
    assert wait_until(lambda: not any(pid_alive(p) for p in pids.values()), timeout=10), pids
    assert not os.path.exists(ipc_dir)
