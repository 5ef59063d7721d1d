"""The server end to end: one live server (3 processes) on the tiny model for the whole module, started
through ``radixlm.Runtime`` with an API key, exercised with the official ``openai`` client, raw HTTP
and the ZeroMQ front door. Ends with the KV invariant and a shutdown that leaves no process behind."""

from __future__ import annotations

import json
import os
import pickle
import threading

import httpx
import openai
import pytest
import requests
import zmq

from radixlm.runtime.protocol import ClientError, ClientGenerate, decode_front_door_reply, encode
from radixlm.runtime.server import FrontDoorClient, Runtime
from radixlm.runtime.server.client import FrontDoorError
from tests.server_helpers import check_kv_invariant, pid_alive, stats, wait_until

pytestmark = pytest.mark.slow  # starts servers or subprocesses: not in the fast tier

KEY = "test-key"
BODY_LIMIT = 64 * 1024
MAX_TOTAL = 4096
GREEDY = {"temperature": 0.0}
LONG = {"max_new_tokens": 2000, "ignore_eos": True, **GREEDY}  # runs for seconds unless aborted


@pytest.fixture(scope="module")
def rt(tiny_llama):
    runtime = Runtime(model_path=tiny_llama, device="cpu", max_total_tokens=MAX_TOTAL, api_key=KEY,
                      max_request_body_bytes=BODY_LIMIT, log_level="warning", log_interval_s=0.0)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="module")
def auth(rt):
    return {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def oai(rt):
    return openai.OpenAI(base_url=rt.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def gen(rt, auth, body, expect=200):
    r = requests.post(rt.url + "/generate", json=body, headers=auth, timeout=60)
    assert r.status_code == expect, r.text
    return r.json()


def sse(resp) -> list:
    """Parse an SSE body into JSON events; asserts it ends with [DONE]."""
    events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# --------------------------------------------------------------------------- OpenAI client
def test_completion_matches_native_generate(rt, auth, oai):
    c = oai.completions.create(model="default", prompt="Hello world", max_tokens=12, temperature=0)
    native = gen(rt, auth, {"text": "Hello world", "sampling_params": {"max_new_tokens": 12, **GREEDY}})
    assert c.choices[0].text == native["text"]
    assert c.object == "text_completion"
    assert c.usage.completion_tokens == native["meta_info"]["completion_tokens"]
    assert c.usage.prompt_tokens == native["meta_info"]["prompt_tokens"]
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert c.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_chat_template(rt, auth, oai):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    c = oai.chat.completions.create(model="default", messages=msgs, max_tokens=10, temperature=0)
    from radixlm.runtime.hf_tokenizer import load_tokenizer

    tok = load_tokenizer(rt.server_args.model_path)
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
    native = gen(rt, auth, {"input_ids": ids, "sampling_params": {"max_new_tokens": 10, **GREEDY}})
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == native["text"]
    assert c.usage.prompt_tokens == len(ids)


def test_streaming_equals_non_streaming(oai):
    ref = oai.completions.create(model="default", prompt="Once upon", max_tokens=16, temperature=0)
    chunks = list(oai.completions.create(model="default", prompt="Once upon", max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == ref.choices[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [ref.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.usage.completion_tokens

    msgs = [{"role": "user", "content": "Tell me"}]
    cref = oai.chat.completions.create(model="default", messages=msgs, max_tokens=16, temperature=0)
    cchunks = list(oai.chat.completions.create(model="default", messages=msgs, max_tokens=16, temperature=0, stream=True))
    assert cchunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in cchunks) == cref.choices[0].message.content
    assert all(ch.usage is None for ch in cchunks)  # no include_usage → no usage chunk


def test_n2_and_seed(oai):
    kw = dict(model="default", prompt="The cat", max_tokens=8, temperature=1.0, n=2, seed=7)
    c = oai.completions.create(**kw)
    assert [ch.index for ch in c.choices] == [0, 1]
    assert c.usage.prompt_tokens == oai.completions.create(model="default", prompt="The cat", max_tokens=1).usage.prompt_tokens
    again = oai.completions.create(**kw)
    assert [ch.text for ch in again.choices] == [ch.text for ch in c.choices]  # seeded → reproducible
    streamed = list(oai.completions.create(stream=True, **kw))
    by_index = {0: "", 1: ""}
    for ch in streamed:
        for choice in ch.choices:
            by_index[choice.index] += choice.text
    assert [by_index[0], by_index[1]] == [ch.text for ch in c.choices]


def test_stop_string(oai):
    full = oai.completions.create(model="default", prompt="Hello world", max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    stop = full[6:9]
    assert len(stop) == 3 and stop.strip(), full
    c = oai.completions.create(model="default", prompt="Hello world", max_tokens=24, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert c.choices[0].text == full[: full.find(stop)]
    assert c.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in oai.completions.create(
        model="default", prompt="Hello world", max_tokens=24, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}) if ch.choices)
    assert streamed == c.choices[0].text


def test_logprobs(oai):
    c = oai.completions.create(model="default", prompt="Hello", max_tokens=6, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert "".join(lp.tokens) == c.choices[0].text or "\ufffd" in "".join(lp.tokens)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0.0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the top token

    ch = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = ch.choices[0].logprobs.content
    assert len(content) == ch.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
               for t in content)


def test_models_and_info(rt, auth, oai):
    assert [m.id for m in oai.models.list().data] == [os.path.basename(rt.server_args.model_path)]
    info = requests.get(rt.url + "/get_model_info", headers=auth, timeout=30).json()
    assert info["context_length"] > 0 and info["is_generation"] is True
    si = requests.get(rt.url + "/server_info", headers=auth, timeout=30).json()
    assert si["zmq_frontdoor"] == rt.zmq_address and "api_key" not in si
    assert si["scheduler_stats"]["max_total_tokens"] == MAX_TOTAL
    assert requests.get(rt.url + "/health_generate", headers=auth, timeout=60).status_code == 200


# --------------------------------------------------------------------------- native API
def test_native_single_batch_stream(rt, auth):
    sp = {"max_new_tokens": 8, **GREEDY}
    a = gen(rt, auth, {"text": "alpha", "sampling_params": sp})
    b = gen(rt, auth, {"text": "beta gamma", "sampling_params": sp})
    batch = gen(rt, auth, {"text": ["alpha", "beta gamma"], "sampling_params": sp})
    assert [r["text"] for r in batch] == [a["text"], b["text"]]
    assert [r["output_ids"] for r in batch] == [a["output_ids"], b["output_ids"]]

    r = requests.post(rt.url + "/generate", headers=auth, timeout=60,
                      json={"text": "alpha", "sampling_params": sp, "stream": True})
    events = sse(r)
    assert events[-1]["text"] == a["text"] and events[-1]["output_ids"] == a["output_ids"]
    assert all(events[i + 1]["text"].startswith(events[i]["text"]) for i in range(len(events) - 1))
    assert events[-1]["meta_info"]["finish_reason"] == a["meta_info"]["finish_reason"]


def test_native_logprobs_and_ids(rt, auth):
    ids = [1, 300, 301, 302, 303]
    out = gen(rt, auth, {"input_ids": ids, "sampling_params": {"max_new_tokens": 3, **GREEDY}, "return_logprob": True,
                         "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True})
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == len(ids) and meta["input_token_logprobs"][0][0] is None
    assert [e[1] for e in meta["input_token_logprobs"]] == ids
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(isinstance(e[2], str) for e in meta["output_token_logprobs"])
    assert all(len(t) == 2 for t in meta["output_top_logprobs"])


def test_abort_request_by_rid(rt, auth):
    result = {}

    def run():
        result["r"] = gen(rt, auth, {"text": "long", "rid": "abort-me",
                                     "sampling_params": LONG})

    t = threading.Thread(target=run)
    t.start()
    assert wait_until(lambda: stats(rt.url, auth)["num_running_reqs"] == 1, timeout=30)
    r = requests.post(rt.url + "/abort_request", json={"rid": "abort-me"}, headers=auth, timeout=30)
    assert r.json() == {"success": True}
    t.join(30)
    assert result["r"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert result["r"]["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]


def test_metrics(rt, auth):
    text = requests.get(rt.url + "/metrics", headers=auth, timeout=30).text
    for name in ("radixlm:num_running_reqs", "radixlm:num_waiting_reqs", "radixlm:token_usage",
                 "radixlm:cache_hit_rate", "radixlm:gen_throughput", "radixlm:time_to_first_token_seconds_bucket",
                 "radixlm:inter_token_latency_seconds_bucket"):
        assert name in text, name
    count = [line for line in text.splitlines() if line.startswith("radixlm:time_to_first_token_seconds_count")]
    assert count and float(count[0].split()[-1]) > 0


# --------------------------------------------------------------------------- security
def test_api_key(rt, auth):
    assert requests.get(rt.url + "/health", timeout=10).status_code == 200  # the one open route
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = requests.post(rt.url + "/generate", json={"text": "x"}, headers=headers, timeout=10)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert requests.get(rt.url + "/get_server_info", headers=headers, timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=rt.url + "/v1", api_key="nope", max_retries=0).models.list()
    with FrontDoorClient(rt.zmq_address, api_key="nope", timeout=30) as bad:
        with pytest.raises(FrontDoorError) as ei:
            bad.generate({"text": "x", "sampling_params": {"max_new_tokens": 1}})
        assert ei.value.status == 401


# --------------------------------------------------------------------------- bad input
def _long_ids(rt, auth):
    ctx = requests.get(rt.url + "/get_model_info", headers=auth, timeout=10).json()["context_length"]
    return [5] * (ctx + 1)


BAD_HTTP = [
    ("malformed json", "/v1/completions", b'{"prompt": "x", ', None),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("wrong type native", "/generate", {"text": 5}, None),
    ("unknown sampling field", "/generate", {"text": "x", "sampling_params": {"max_tokenz": 3}}, None),
    ("empty messages", "/v1/chat/completions", {"messages": []}, "messages"),
    ("empty body", "/v1/completions", b"", None),
    ("not an object", "/v1/completions", b"[1, 2]", None),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("absurd max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ("absurd native max_new_tokens", "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 10**9}},
     "max_new_tokens"),
    ("negative temperature", "/generate", {"text": "x", "sampling_params": {"temperature": -1}}, None),
    ("invalid utf-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', None),
    ("empty prompt", "/generate", {"input_ids": []}, None),
    ("bad regex", "/v1/completions", {"prompt": "x", "regex": "(unclosed"}, "regex"),
    ("bad native regex", "/generate", {"text": "x", "sampling_params": {"regex": "[z-a]"}}, "regex"),
    ("bad schema", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, None),
    ("schema without schema", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format"),
]


def _expect_400(r, param=None, status=400):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"], err


@pytest.mark.parametrize("name,path,body,param", BAD_HTTP, ids=[b[0] for b in BAD_HTTP])
def test_bad_input_then_good(rt, auth, name, path, body, param):
    kw = {"data": body, "headers": dict(auth, **{"Content-Type": "application/json"})} if isinstance(body, bytes) \
        else {"json": body, "headers": auth}
    r = requests.post(rt.url + path, timeout=30, **kw)
    _expect_400(r, param)
    assert gen(rt, auth, {"text": "ok", "sampling_params": {"max_new_tokens": 2}})["meta_info"]["completion_tokens"] == 2


def test_prompt_over_context_and_body_limit(rt, auth):
    long_ids = _long_ids(rt, auth)
    _expect_400(requests.post(rt.url + "/generate", json={"input_ids": long_ids}, headers=auth, timeout=30), "input_ids")
    _expect_400(requests.post(rt.url + "/v1/completions", json={"prompt": long_ids[:-2], "max_tokens": 16},
                              headers=auth, timeout=30), "max_tokens")
    big = {"text": "a" * (BODY_LIMIT + 10)}
    _expect_400(requests.post(rt.url + "/generate", json=big, headers=auth, timeout=30), status=413)

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"text": "'
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b"a" * 1000
        yield b'"}'

    _expect_400(requests.post(rt.url + "/generate", data=chunked(), headers=auth, timeout=30), status=413)
    assert gen(rt, auth, {"text": "ok", "sampling_params": {"max_new_tokens": 2}})["meta_info"]["completion_tokens"] == 2


def test_bad_input_beside_a_running_stream(rt, auth):
    """A stream running while bad requests arrive finishes with exactly the text it would have had."""
    body = {"text": "stream beside", "sampling_params": {"max_new_tokens": 64, "ignore_eos": True, **GREEDY}}
    ref = gen(rt, auth, body)
    out = {}

    def run():
        out["events"] = sse(requests.post(rt.url + "/generate", json=dict(body, stream=True), headers=auth, timeout=60))

    t = threading.Thread(target=run)
    t.start()
    for _, path, bad, _ in BAD_HTTP[:6]:
        kw = {"data": bad} if isinstance(bad, bytes) else {"json": bad}
        assert requests.post(rt.url + path, headers=auth, timeout=30, **kw).status_code == 400
    t.join(60)
    assert out["events"][-1]["text"] == ref["text"]


def test_zmq_front_door_bad_messages_then_good(rt):
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(rt.zmq_address)
    try:
        bad_payloads = [
            [b"\x00\xff garbage"],
            [pickle.dumps({"type": "ClientGenerate", "req_id": "x", "body": {}})],
            [b""],
            [b"a", b"b"],
            [encode(ClientGenerate(req_id="r1", body={"text": "x", "sampling_params": {"top_p": 5}}, api_key=KEY))],
            [encode(ClientGenerate(req_id="r2", body={"prompt": "x"}, api_key=KEY))],
            [encode(ClientGenerate(req_id="r3", body={"text": "x" * (BODY_LIMIT + 1)}, api_key=KEY))],
        ]
        for frames in bad_payloads:
            s.send_multipart(frames)
            assert s.poll(30000), frames
            reply = decode_front_door_reply(s.recv())
            assert isinstance(reply, ClientError) and reply.status in (400, 413), reply
    finally:
        s.close(0)
        ctx.term()
    ep = rt.endpoint
    ref = ep.generate({"text": "zmq", "sampling_params": {"max_new_tokens": 6, **GREEDY}})
    assert ref["meta_info"]["completion_tokens"] == 6
    chunks = list(ep.generate_stream({"text": "zmq", "sampling_params": {"max_new_tokens": 6, **GREEDY}}))
    assert chunks[-1]["text"] == ref["text"]
    assert ep.get_model_info()["context_length"] > 0
    assert ep.get_server_info()["zmq_frontdoor"] == rt.zmq_address
    batch = ep.generate({"text": ["a", "b"], "sampling_params": {"max_new_tokens": 2}})
    assert isinstance(batch, list) and len(batch) == 2


# --------------------------------------------------------------------------- disconnects
def _idle_and_released(rt, auth):
    s = stats(rt.url, auth)
    return s["num_running_reqs"] == 0 and s["num_waiting_reqs"] == 0 and s["protected_tokens"] == 0


def _generated(rt, auth) -> int:
    return stats(rt.url, auth)["total_generated_tokens"]


def _assert_aborted(rt, auth, before: int) -> None:
    """The request stopped early (fewer tokens than its budget) and gave all its KV back."""
    assert wait_until(lambda: _idle_and_released(rt, auth), timeout=10), stats(rt.url, auth)
    assert _generated(rt, auth) - before < LONG["max_new_tokens"]
    check_kv_invariant(rt.url, auth)


def test_abort_on_http_disconnect(rt, auth):
    # Streaming: read the first chunk, then hang up.
    before = _generated(rt, auth)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", rt.url + "/generate", headers=auth,
                           json={"text": "bye", "sampling_params": LONG, "stream": True}) as r:
            next(r.iter_lines())
    _assert_aborted(rt, auth, before)
    # Non-streaming: give up waiting.
    before = _generated(rt, auth)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(rt.url + "/v1/completions", headers=auth, timeout=httpx.Timeout(60, read=0.3),
                   json={"prompt": "bye", "max_tokens": 2000, "ignore_eos": True, "temperature": 0})
    _assert_aborted(rt, auth, before)


def test_abort_on_zmq_disconnect(rt, auth):
    before = _generated(rt, auth)
    client = FrontDoorClient(rt.zmq_address, api_key=KEY, timeout=30)
    stream = client.generate_stream({"text": "bye", "sampling_params": LONG})
    next(stream)
    client.close()  # the socket goes away without an abort message: the server sees the disconnect
    _assert_aborted(rt, auth, before)
    # Breaking out of a stream sends an explicit abort.
    with FrontDoorClient(rt.zmq_address, api_key=KEY, timeout=30) as c2:
        before = _generated(rt, auth)
        for _ in c2.generate_stream({"text": "bye", "sampling_params": LONG}):
            break
        _assert_aborted(rt, auth, before)
        assert c2.generate({"text": "still", "sampling_params": {"max_new_tokens": 2}})["meta_info"]["completion_tokens"] == 2


# --------------------------------------------------------------------------- the end
# --------------------------------------------------------------------------- constrained decoding
def test_constrained_decoding_over_http(rt, auth):
    import json
    import re

    import jsonschema

    client = openai.OpenAI(base_url=rt.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"]}
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "A person:"}], max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    if chat.choices[0].finish_reason == "stop":
        jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    obj = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Any object:"}], max_tokens=64, temperature=0,
        response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    ip = r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    comp = client.completions.create(model="default", prompt="IP:", max_tokens=32, temperature=1.0, n=3,
                                     extra_body={"regex": ip})
    for c in comp.choices:
        assert c.finish_reason == "length" or re.fullmatch(ip, c.text), c.text
    native = gen(rt, auth, {"text": "Color:", "sampling_params": {"regex": "(red|green|blue)", "max_new_tokens": 8}})
    assert native["text"] in ("red", "green", "blue")


def test_zz_kv_invariant_flush_and_clean_shutdown(rt, auth):
    check_kv_invariant(rt.url, auth)
    r = requests.post(rt.url + "/flush_cache", headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["success"] is True
    s = check_kv_invariant(rt.url, auth)
    assert s["free_tokens"] == MAX_TOTAL
    info = requests.get(rt.url + "/get_server_info", headers=auth, timeout=30).json()
    pids = list(info["pids"].values())
    assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    import os

    assert oct(os.stat(info["ipc_dir"]).st_mode & 0o777) == "0o700"
    rt.shutdown()  # SIGTERM
    assert rt.process.returncode == 0
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=10), [p for p in pids if pid_alive(p)]
    assert not os.path.exists(info["ipc_dir"])

