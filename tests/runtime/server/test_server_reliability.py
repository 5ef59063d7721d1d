"""The issue's reproductions against a live server: every one is a 400 naming the field (HTTP native,
OpenAI, the ZeroMQ front door), the server stays up, and nothing is left behind: ``num_active_requests``
is 0 and the KV pool all free after a hypothesis fuzz of the request bodies (no 5xx)."""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radixlm.runtime.server import FrontDoorClient, Runtime
from radixlm.runtime.server.client import FrontDoorError
from tests.server_helpers import check_kv_invariant, wait_until
from tests.runtime.test_validation import _req, _wellformed

pytestmark = pytest.mark.slow  # starts a server

BIG = 18446744073709551615


@pytest.fixture(scope="module")
def rt(tiny_llama):
    runtime = Runtime(model_path=tiny_llama, device="cpu", max_total_tokens=4096, log_level="error",
                      log_interval_s=0.0, max_n=8, max_prompts_per_request=16, grammar_compile_timeout=2.0,
                      max_tokens_default_cap=16)
    yield runtime
    runtime.shutdown()


def post(rt, path: str, body) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(rt.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=120)


def model(rt) -> str:
    return requests.get(rt.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def num_active(rt) -> int:
    return requests.get(rt.url + "/get_server_info", timeout=30).json()["num_active_requests"]


NATIVE = [
    ({"text": "Hello world", "sampling_params": {"max_new_tokens": 4, "top_k": BIG}}, "top_k"),
    ({"text": "Hello world", "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 2,
                                                   "stop_token_ids": [1000000]}}, "stop_token_ids"),
    ({"input_ids": [1, 2, 2**64 + 5]}, "input_ids"),
    ({"text": "Hello", "sampling_params": {"seed": 2**65}}, "seed"),
    ({"text": "Hello", "return_logprob": True, "logprob_start_len": 2**65}, "logprob_start_len"),
    ({"text": "Hello", "return_logprob": True, "top_logprobs_num": 2**65}, "top_logprobs_num"),
    ({"text": "Hello", "sampling_params": {"n": 20000}}, "n"),
    ({"text": ["a"] * 100}, "text"),
    ({"text": "Hello", "sampling_params": {"regex": "(?:a{100000}){100000}"}}, "regex"),
    ({"text": "Hello", "sampling_params": {"regex": "(a|b)*a(a|b){18}", "max_new_tokens": 4}}, "regex"),
]


@pytest.mark.parametrize("body, field", NATIVE)
def test_native_reproductions_are_400s(rt, body, field):
    r = post(rt, "/generate", body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_lone_surrogates_are_400s_not_leaks(rt):
    before = num_active(rt)
    raw = '{"text": "Hello", "sampling_params": {"max_new_tokens": 2, "stop": ["\\ud800"]}}'
    for _ in range(50):
        r = post(rt, "/generate", raw)
        assert r.status_code == 400 and "stop" in r.json()["error"]["message"], r.text
    chat = '{"messages": [{"role": "user", "content": "hi \\udfff"}], "max_tokens": 2, "model": "%s"}' % model(rt)
    r = post(rt, "/v1/chat/completions", chat)
    assert r.status_code == 400 and "content" in r.json()["error"]["message"], r.text
    assert num_active(rt) == before == 0


def test_deeply_nested_bodies_are_400s(rt):
    r = post(rt, "/generate", '{"text": "x", "rid": ' + "[" * 5000 + "]" * 5000 + "}")
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text
    deep = '{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000
    r = post(rt, "/generate", {"text": "x", "sampling_params": {"json_schema": deep}})
    assert r.status_code == 400 and "json_schema" in r.json()["error"]["message"], r.text


def test_openai_reproductions_are_400s(rt):
    for body, field in [
        ({"prompt": "Hello", "max_tokens": 4, "top_k": BIG}, "top_k"),
        ({"prompt": "Hello", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [1000000]}, "stop_token_ids"),
        ({"prompt": ["x"] * 100, "max_tokens": 1, "n": 2}, "prompt"),
        ({"prompt": "Hello", "max_tokens": 2, "seed": 2**70}, "seed"),
    ]:
        r = post(rt, "/v1/completions", {"model": model(rt), **body})
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"], r.text


def test_omitted_max_tokens_is_bounded_by_the_flag(rt):
    r = post(rt, "/v1/completions", {"model": model(rt), "prompt": "Hello", "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 16  # not the rest of the 2048-token context


def test_zmq_reproductions_are_errors_naming_the_field(rt):
    with FrontDoorClient(rt.zmq_address, timeout=60) as c:
        zmq_cases = [  # msgpack carries integers up to 2**64 - 1: the client cannot even send larger ones
            (NATIVE[0][0], "top_k"), (NATIVE[1][0], "stop_token_ids"), ({"input_ids": [1, BIG]}, "input_ids"),
            ({"text": "Hello", "sampling_params": {"seed": BIG}}, "seed"),
            ({"text": "Hello", "return_logprob": True, "top_logprobs_num": BIG}, "top_logprobs_num"),
            (NATIVE[6][0], "n"), (NATIVE[7][0], "text"),
        ]
        for body, field in zmq_cases:
            with pytest.raises(FrontDoorError, match=field) as ei:
                c.generate(body)
            assert ei.value.status == 400
        assert c.generate({"text": "Hello", "sampling_params": {"max_new_tokens": 2}})["meta_info"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(_req, _wellformed))
def test_fuzz_native_generate_no_5xx(rt, body):
    body = dict(body)
    sp = body.get("sampling_params")
    if isinstance(sp, dict) and isinstance(sp.get("max_new_tokens"), int) and 0 <= sp["max_new_tokens"] <= 8:
        pass
    elif isinstance(sp, dict):
        sp = dict(sp, max_new_tokens=4)  # keep accepted requests short
        body["sampling_params"] = sp
    try:
        data = json.dumps(body)
    except (TypeError, ValueError):
        return
    r = post(rt, "/generate", data)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code


def test_after_the_fuzz_nothing_is_left(rt):
    assert wait_until(lambda: num_active(rt) == 0, timeout=30), num_active(rt)
    s = check_kv_invariant(rt.url)
    assert s["detokenizer_states"] == 0 and s["detokenizer_pending"] == 0, s  # nothing tracked there either
    assert requests.get(rt.url + "/health", timeout=10).status_code == 200
