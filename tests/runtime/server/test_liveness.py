"""Liveness tells the truth (live servers started through the CLI, because these tests stop or kill them):

* a stopped scheduler (SIGSTOP) turns /health and /health_generate red within --health-stall-timeout,
  and green again when it resumes;
* --request-timeout ends a request the server cannot finish (504), releasing everything it held;
* a ZeroMQ client waiting on a stopped or killed server gets an error within seconds, never a hang;
* a killed server's IPC directory is removed by the next server's start.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import requests

from radixlm.runtime.server.client import HEARTBEAT_TIMEOUT_S, FrontDoorClient, FrontDoorError
from tests.server_helpers import check_kv_invariant, pid_alive, start_cli_server, wait_until

pytestmark = pytest.mark.slow  # starts and kills servers

STALL_S = 2.0
REQUEST_TIMEOUT_S = 4.0
LONG = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0.0}


def _start(model: str, *extra: str):
    proc, url = start_cli_server(model, *extra)
    info = requests.get(url + "/get_server_info", timeout=30).json()
    return proc, url, info


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tiny_llama):
    proc, url, info = _start(tiny_llama, "--health-stall-timeout", str(STALL_S),
                             "--request-timeout", str(REQUEST_TIMEOUT_S))
    yield proc, url, info
    _stop(proc)


def _status(url: str, path: str) -> tuple[int, str]:
    try:
        r = requests.get(url + path, timeout=30)
        return r.status_code, r.text
    except requests.RequestException as e:
        return 0, repr(e)


def test_stopped_scheduler_turns_health_red_and_requests_time_out(server):
    proc, url, info = server
    sched = info["pids"]["scheduler"]
    result: dict = {}

    def client():
        t0 = time.monotonic()
        r = requests.post(url + "/generate", json={"text": "a", "sampling_params": LONG}, timeout=60)
        result["r"] = (r.status_code, r.json(), time.monotonic() - t0)

    t = threading.Thread(target=client)
    t.start()
    time.sleep(0.5)
    os.kill(sched, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        assert wait_until(lambda: _status(url, "/health")[0] == 503, timeout=STALL_S + 5)
        red_after = time.monotonic() - stopped
        code, text = _status(url, "/health")
        assert code == 503 and "no progress" in text
        assert _status(url, "/health_generate")[0] == 503
        # server info still answers (the last stats it has, marked stale), never a 500
        r = requests.get(url + "/get_server_info", timeout=30)
        assert r.status_code == 200 and r.json()["scheduler_stats"].get("stale") is True
        t.join(REQUEST_TIMEOUT_S + 10)
        status, body, took = result["r"]
        assert status == 504 and "request-timeout" in body["error"]["message"], body
        assert took < REQUEST_TIMEOUT_S + 2
    finally:
        os.kill(sched, signal.SIGCONT)
    assert red_after < STALL_S + 2.5
    assert wait_until(lambda: _status(url, "/health")[0] == 200, timeout=10)
    assert _status(url, "/health_generate")[0] == 200
    assert wait_until(lambda: requests.get(url + "/get_server_info", timeout=30).json()["num_active_requests"] == 0,
                      timeout=10)
    check_kv_invariant(url)


def test_request_timeout_releases_everything(server):
    _, url, _ = server
    r = requests.post(url + "/v1/completions", timeout=60,
                      json={"model": requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"],
                            "prompt": "b", "max_tokens": 1900, "ignore_eos": True, "temperature": 0,
                            "stream": False})
    # finishes in time on a fast machine, else 504: either way nothing may be left behind
    assert r.status_code in (200, 504), r.text
    assert wait_until(lambda: requests.get(url + "/get_server_info", timeout=30).json()["num_active_requests"] == 0,
                      timeout=10)
    check_kv_invariant(url)


def test_stopped_then_killed_server_fails_zmq_clients_and_leaves_no_ipc_dir(server, tiny_llama):
    proc, url, info = server
    outcome: dict = {}

    def client():
        with FrontDoorClient(info["zmq_frontdoor"]) as c:  # no timeout: liveness alone must end the wait
            try:
                c.generate({"text": "c", "sampling_params": LONG})
                outcome["r"] = ("ok", time.monotonic())
            except FrontDoorError as e:
                outcome["r"] = (e.status, time.monotonic())

    t = threading.Thread(target=client)
    t.start()
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGSTOP)  # the front process: HTTP, ZeroMQ front door, tokenizer manager
    stopped = time.monotonic()
    t.join(HEARTBEAT_TIMEOUT_S + 10)
    assert not t.is_alive(), "the ZeroMQ client hung on a stopped server"
    status, at = outcome["r"]
    assert status == 503 and at - stopped < HEARTBEAT_TIMEOUT_S + 3
    os.kill(proc.pid, signal.SIGKILL)  # no exit handler runs: the IPC directory stays behind
    proc.wait()
    assert os.path.isdir(info["ipc_dir"])
    children = [p for k, p in info["pids"].items() if k != "tokenizer_manager"]
    assert wait_until(lambda: not any(pid_alive(p) for p in children), timeout=15)

    proc2, url2, info2 = _start(tiny_llama)
    try:
        assert not os.path.exists(info["ipc_dir"])  # cleaned at the next start
        outcome.clear()

        def client2():
            with FrontDoorClient(info2["zmq_frontdoor"]) as c:
                try:
                    c.generate({"text": "d", "sampling_params": LONG})
                    outcome["r"] = ("ok", time.monotonic())
                except FrontDoorError as e:
                    outcome["r"] = (e.status, time.monotonic())

        t = threading.Thread(target=client2)
        t.start()
        time.sleep(1.0)
        os.kill(proc2.pid, signal.SIGKILL)
        killed = time.monotonic()
        t.join(15)
        assert not t.is_alive()
        status, at = outcome["r"]
        assert status == 503 and at - killed < 3.0
    finally:
        _stop(proc2)
