"""The router and ``--dp-size`` end to end: two live workers (tiny model, CPU) behind ``radixlm router``
subprocesses with each policy; the DSL through the router; failover; ``radixlm serve --dp-size 2``.

The workers' KV pools (``POOL`` tokens) hold about four of the eight group prefixes of the shared-prefix
workload, not all eight: the regime a router exists for (a fleet's working set exceeds one worker's
cache). ``cache_aware`` gives each worker four groups, which fit; ``round_robin`` sends every group to
both workers, whose caches then thrash.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import pytest
import requests

import radixlm as sgl
from radixlm.runtime.child_process import child_env, python_command
from radixlm.runtime.server import Runtime
from radixlm.runtime.server.ipc import free_port
from tests.server_helpers import check_kv_invariant, wait_until

pytestmark = pytest.mark.slow  # starts servers and routers

POOL = 1700
GREEDY = {"temperature": 0.0, "max_new_tokens": 8}
POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")


def _worker(model: str, **kw) -> Runtime:
    return Runtime(model_path=model, device="cpu", max_total_tokens=POOL, log_level="warning", log_interval_s=0.0,
                   **kw)


@pytest.fixture(scope="module")
def workers(tiny_llama) -> Iterator[list[Runtime]]:
    with ThreadPoolExecutor(2) as pool:
        rts = list(pool.map(lambda _: _worker(tiny_llama), range(2)))
    yield rts
    for rt in rts:
        rt.shutdown()


@contextmanager
def router(urls: list[str], policy: str = "cache_aware", *flags: str, wait_healthy: bool = True) -> Iterator[str]:
    port = free_port()
    cmd = python_command("radixlm.runtime.cli", "router", "--worker-urls", *urls, "--policy", policy,
                         "--port", str(port), "--health-check-interval-s", "0.5", "--log-level", "warning", *flags)
    proc = subprocess.Popen(cmd, env=child_env())
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return requests.get(url + "/health", timeout=2).status_code == (200 if wait_healthy else 503)
            except requests.RequestException:
                return False

        assert wait_until(up, timeout=60, interval=0.2), "the router did not come up"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def flush(urls: list[str]) -> None:
    for u in urls:
        assert requests.post(u + "/flush_cache", timeout=30).status_code == 200


def generate(url: str, body: dict, expect: int = 200) -> dict:
    r = requests.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == expect, r.text
    return r.json()


def sse(resp: requests.Response) -> list[dict]:
    events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def workers_of(url: str) -> dict[str, dict]:
    return {w["url"]: w for w in requests.get(url + "/list_workers", timeout=30).json()["workers"]}


# --------------------------------------------------------------------------- every policy, every API
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_serves_native_openai_streaming_and_abort(workers, policy):
    urls = [w.url for w in workers]
    direct = generate(urls[0], {"text": "Hello router", "sampling_params": GREEDY})
    with router(urls, policy) as url:
        # native, plain and streaming: the same greedy text as a worker gives
        out = generate(url, {"text": "Hello router", "sampling_params": GREEDY})
        assert out["text"] == direct["text"] and out["meta_info"]["completion_tokens"] == 8
        r = requests.post(url + "/generate", json={"text": "Hello router", "sampling_params": GREEDY, "stream": True},
                          timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = sse(r)
        assert chunks[-1]["text"] == direct["text"]
        batch = generate(url, {"text": ["Hello router", "Hello router, again"], "sampling_params": GREEDY})
        assert [b["text"] for b in batch][0] == direct["text"]
        # OpenAI completions and chat (plain and streaming)
        m = requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        c = requests.post(url + "/v1/completions", json={"model": m, "prompt": "Hello router", "max_tokens": 8,
                                                        "temperature": 0}, timeout=60).json()
        assert c["choices"][0]["text"] == direct["text"]
        msgs = [{"role": "user", "content": "Hi"}]
        chat = requests.post(url + "/v1/chat/completions", json={"model": m, "messages": msgs, "max_tokens": 6,
                                                                "temperature": 0}, timeout=60).json()
        r = requests.post(url + "/v1/chat/completions", json={"model": m, "messages": msgs, "max_tokens": 6,
                                                             "temperature": 0, "stream": True}, timeout=60)
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse(r) if e.get("choices"))
        assert streamed == chat["choices"][0]["message"]["content"]
        # reads forwarded to a worker; bad input answered by the worker with its 400
        assert requests.get(url + "/get_model_info", timeout=30).json()["model_path"] == workers[0].server_args.model_path
        assert requests.get(url + "/v1/models", timeout=30).json()["data"]
        bad = requests.post(url + "/generate", json={"text": "x", "sampling_params": {"temperature": -1}}, timeout=30)
        assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
        # abort by rid reaches the worker that runs it
        result: dict = {}
        long = {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0.0}
        t = threading.Thread(target=lambda: result.update(r=generate(url, {"text": "long", "rid": f"ab-{policy}",
                                                                             "sampling_params": long})))
        t.start()
        assert wait_until(lambda: sum(w["load"] for w in workers_of(url).values()) == 1, timeout=30)
        time.sleep(0.3)
        assert requests.post(url + "/abort_request", json={"rid": f"ab-{policy}"}, timeout=30).json() == {"success": True}
        t.join(60)
        assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort"
        if policy == "round_robin":  # SGLang's abort_all reaches every worker
            result.clear()
            t = threading.Thread(target=lambda: result.update(r=generate(url, {"text": "long too",
                                                                                 "sampling_params": long})))
            t.start()
            assert wait_until(lambda: sum(w["load"] for w in workers_of(url).values()) == 1, timeout=30)
            time.sleep(0.3)
            reply = requests.post(url + "/abort_request", json={"abort_all": True}, timeout=30).json()
            assert reply == {"success": True, "aborted": 1}
            t.join(60)
            assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort"
        metrics = requests.get(url + "/metrics", timeout=30).text
        for name in ("radixlm_router:requests_total", "radixlm_router:worker_cache_hit_rate",
                     "radixlm_router:in_flight_requests", "radixlm_router:worker_waiting_requests"):
            assert name in metrics
        info = requests.get(url + "/get_server_info", timeout=30).json()
        assert info["router"] and info["policy"] == policy and info["zmq_frontdoor"] is None
    for w in workers:
        check_kv_invariant(w.url)


# --------------------------------------------------------------------------- cache-aware routing
def _group_workload(seed: int = 0) -> list[tuple[int, str]]:
    reqs = []
    for g in range(8):
        system = f"System prompt {g}: you are assistant number {g}. " + " ".join(
            f"rule {g}.{i}: be kind and exact about item {i * 7 + g}." for i in range(15))
        reqs += [(g, system + f" Question {q}: what about item {q * 3 + g}?") for q in range(16)]
    random.Random(seed).shuffle(reqs)
    return reqs


def _run_workload(url: str, reqs: list[tuple[int, str]], concurrency: int = 6) -> list[dict]:
    def one(item):
        return generate(url, {"text": item[1], "sampling_params": {"temperature": 0.0, "max_new_tokens": 2}})

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, reqs))


def test_cache_aware_keeps_each_prefix_group_on_one_worker(workers):
    urls = [w.url for w in workers]
    reqs = _group_workload()
    cached = {}
    for policy in ("round_robin", "cache_aware"):
        flush(urls)
        with router(urls, policy) as url:
            outs = _run_workload(url, reqs)
            cached[policy] = sum(o["meta_info"]["cached_tokens"] for o in outs)
            per_worker = {u: w["requests_total"] for u, w in workers_of(url).items()}
            assert sum(per_worker.values()) == len(reqs)
            if policy == "cache_aware":
                # each worker served a share, and each group lived on one worker: the hit rate is what one
                # worker per group would have (every request but each group's first hits its prefix)
                assert min(per_worker.values()) >= len(reqs) // 4
                prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs)
                assert cached[policy] / prompt > 0.8
    print("cached tokens by policy:", cached)
    # round_robin's count depends on how the six concurrent streams interleave with evictions (1.77-2.17x
    # seen); a policy that ignored prefixes would land near 1.0x, so 1.5x still tells the two apart
    assert cached["cache_aware"] >= 1.5 * cached["round_robin"], cached
    for w in workers:
        check_kv_invariant(w.url)


# --------------------------------------------------------------------------- workers leaving and failing
def test_removing_a_worker_mid_run_loses_no_request(workers):
    urls = [w.url for w in workers]
    with router(urls, "round_robin") as url:
        body = {"sampling_params": {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}}
        done: list[dict] = []
        removed = threading.Event()
        after: list[str] = []

        def one(i: int) -> dict:
            out = generate(url, {"text": f"request number {i}", **body})
            done.append(out)
            return out

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, i) for i in range(24)]
            assert wait_until(lambda: len(done) >= 4, timeout=120)
            r = requests.post(url + "/remove_worker", params={"url": urls[1]}, timeout=30)
            assert r.status_code == 200 and r.json()["success"]
            removed.set()
            results = [f.result(timeout=180) for f in futures]
        assert len(results) == 24 and all(o["meta_info"]["completion_tokens"] == 24 for o in results)
        assert urls[1] not in requests.get(url + "/list_workers", timeout=30).json()["urls"]
        # after the removal every request goes to the remaining worker
        before = workers_of(url)[urls[0]]["requests_total"]
        for i in range(4):
            generate(url, {"text": f"after {i}", **body})
        assert workers_of(url)[urls[0]]["requests_total"] == before + 4
        after.append("ok")
        # it can come back
        assert requests.post(url + "/add_worker", params={"url": urls[1]}, timeout=30).json()["healthy"]
        for i in range(4):
            generate(url, {"text": f"back {i}", **body})
        assert workers_of(url)[urls[1]]["requests_total"] >= 1
        bad = requests.post(url + "/add_worker", params={"url": "ftp://nowhere"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
        assert requests.post(url + "/remove_worker", params={"url": "http://127.0.0.1:1"}, timeout=30).status_code == 404


def _stream_then(url: str, action) -> list[bytes]:
    """Start a long stream, do ``action`` once its first chunk arrived, return the rest of its events
    (which must come within 30 s: the router never leaves a client waiting on a bad worker)."""
    r = requests.post(url + "/generate", stream=True, timeout=60, json={
        "text": "doomed", "stream": True, "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}})
    lines = r.iter_lines()
    first = next(line for line in lines if line.startswith(b"data:"))
    assert "text" in json.loads(first[5:])
    action()
    t0 = time.monotonic()
    rest = [line for line in lines if line.startswith(b"data:")]
    assert time.monotonic() - t0 < 30
    return rest


def _is_stream_error(events: list[bytes]) -> bool:
    return events[-1] == b"data: [DONE]" and "error" in json.loads(events[-2][5:])


def test_a_hung_or_killed_worker_gives_errors_not_hangs(workers, tiny_llama):
    victim = _worker(tiny_llama)
    try:
        # a router that will not notice the crash by itself (no health check for a minute)
        with router([victim.url, workers[0].url], "round_robin", "--health-check-interval-s", "60") as slow_url, \
                router([victim.url], "cache_aware") as url:
            # hung (SIGSTOP): the health checks take it out and the stream in flight ends with an error
            assert _is_stream_error(_stream_then(url, lambda: os.kill(victim.pid, signal.SIGSTOP)))
            assert not workers_of(url)[victim.url]["healthy"]
            os.kill(victim.pid, signal.SIGCONT)
            assert wait_until(lambda: workers_of(url)[victim.url]["healthy"], timeout=30)
            assert generate(url, {"text": "back again", "sampling_params": GREEDY})["meta_info"]["completion_tokens"] == 8
            # killed: the connection drops, the stream ends with an error at once
            assert _is_stream_error(_stream_then(url, lambda: os.kill(victim.pid, signal.SIGKILL)))
            t0 = time.monotonic()
            r = requests.post(url + "/generate", json={"text": "x", "sampling_params": GREEDY}, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
            assert time.monotonic() - t0 < 10
            assert requests.get(url + "/health", timeout=10).status_code == 503
            # the other router still believes in the victim: its requests there fail over to the live worker
            assert workers_of(slow_url)[victim.url]["healthy"]
            for i in range(4):
                out = generate(slow_url, {"text": f"after the crash {i}", "sampling_params": GREEDY})
                assert out["meta_info"]["completion_tokens"] == 8
            assert not workers_of(slow_url)[victim.url]["healthy"]
            assert "radixlm_router:failovers_total 1.0" in requests.get(slow_url + "/metrics", timeout=30).text
    finally:
        try:
            os.kill(victim.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        victim.shutdown()


# --------------------------------------------------------------------------- the DSL over a fleet
@sgl.function
def fleet_program(s, question):
    s += sgl.system("You are a terse assistant. You answer every question with a few words and nothing else.\n")
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=6))
    s += "Mood:" + sgl.select("mood", choices=[" happy", " sad", " somewhat confused"])
    forks = s.fork(2)
    forks += lambda i: f"\nBranch {i}:" + sgl.gen("branch", max_tokens=4)
    forks.join("concate_and_append")


def test_runtime_endpoint_through_the_router_keeps_a_program_on_one_worker(workers):
    urls = [w.url for w in workers]
    direct = sgl.RuntimeEndpoint(urls[0])
    expected = fleet_program.run(question="What is up?", backend=direct, temperature=0.0)
    assert expected.error() is None
    direct.shutdown()
    with router(urls, "cache_aware") as url:
        before = {u: w["requests_total"] for u, w in workers_of(url).items()}
        ep = sgl.RuntimeEndpoint(url)  # no ZeroMQ door at a router: HTTP /generate, unchanged API
        assert ep._client is None
        state = fleet_program.run(question="What is up?", backend=ep, temperature=0.0)
        assert state.error() is None
        assert state.text() == expected.text() and state["mood"] == expected["mood"]
        counts = {u: w["requests_total"] - before[u] for u, w in workers_of(url).items()}
        assert sorted(counts.values())[0] == 0 and sum(counts.values()) >= 6, counts  # all on one worker
        # run_batch of programs with a shared prefix: still one worker for the shared system prompt
        states = fleet_program.run_batch([{"question": f"Question {i}?"} for i in range(4)], backend=ep,
                                         temperature=0.0)
        assert all(st.error() is None for st in states)
        counts = {u: w["requests_total"] - before[u] for u, w in workers_of(url).items()}
        assert sorted(counts.values())[0] == 0, counts
        ep.shutdown()


# --------------------------------------------------------------------------- radixlm serve --dp-size
def test_dp_size_2_serves_and_equals_dp_1(workers, tiny_llama):
    words = ["Apples", "Bridges", "Clouds", "Dragons", "Engines", "Forests", "Glaciers", "Harbors"]
    prompts = [f"{w} are a topic of data parallel prompt {i}: " + "tell me more " * (i % 3) for i, w in enumerate(words)]
    body = {"sampling_params": GREEDY}
    expected = [generate(workers[0].url, {"text": p, **body})["text"] for p in prompts]
    with Runtime(model_path=tiny_llama, device="cpu", max_total_tokens=POOL, log_level="warning",
                 log_interval_s=0.0, dp_size=2) as rt:
        info = rt.get("/get_server_info")
        assert info["router"] and info["policy"] == "cache_aware" and len(info["workers"]) == 2
        assert all(w["healthy"] for w in info["workers"])
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: generate(rt.url, {"text": p, **body})["text"], prompts))
        assert got == expected
        served = [w["requests_total"] for w in rt.get("/list_workers")["workers"]]
        assert min(served) >= 1, served  # distinct prompts: cache misses spread over both replicas
        m = requests.get(rt.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        c = requests.post(rt.url + "/v1/completions", json={"model": m, "prompt": prompts[0], "max_tokens": 8,
                                                           "temperature": 0}, timeout=60).json()
        assert c["choices"][0]["text"] == expected[0]
        state = fleet_program.run(question="What is up?", backend=rt, temperature=0.0)  # HTTP: no ZeroMQ door
        assert state.error() is None and state["answer"] is not None
        for w in info["workers"]:
            check_kv_invariant(w["url"])


def test_router_api_key(workers):
    with router([w.url for w in workers], "round_robin", "--api-key", "router-key") as url:
        assert requests.get(url + "/health", timeout=30).status_code == 200  # open, as on a server
        r = requests.post(url + "/generate", json={"text": "hi", "sampling_params": GREEDY}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        ok = requests.post(url + "/generate", json={"text": "hi", "sampling_params": GREEDY}, timeout=60,
                           headers={"Authorization": "Bearer router-key"})
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 8
