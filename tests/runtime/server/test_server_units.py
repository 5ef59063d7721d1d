"""Server parts without a live server: the detokenizer core, the stream accumulator, request parsing,
the constrained-decoding gate and the CLI round trip. Fast (no model forward, no processes)."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest

from radixlm.runtime.protocol import (
    BatchOut,
    DetokRegister,
    ErrorOut,
    FlushCacheOut,
    LogprobOptions,
    ReqOutput,
    StatsOut,
    TokenizedGenerateReq,
    TokenLogprob,
    decode_tokenizer_manager_input,
    encode,
)
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.server.detokenizer_process import DetokenizerManager
from radixlm.runtime.server.openai_api import constrained_sampling_fields
from radixlm.runtime.server.openai_protocol import ResponseFormat
from radixlm.runtime.server.runtime_handle import server_args_to_argv
from radixlm.runtime.server.native_api import parse_generate_body
from radixlm.runtime.server.native_stream import NativeStreamer
from radixlm.runtime.server.request_errors import RequestError
from radixlm.runtime.server_args import ServerArgs


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from radixlm.runtime.hf_tokenizer import load_tokenizer

    return load_tokenizer(tiny_llama)


def _req(rid: str, stream: bool, **sp) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(rid=rid, input_ids=[1, 2, 3], sampling_params=SamplingParams(**sp), stream=stream)


def _feed(detok: DetokenizerManager, rid: str, ids: list[int], **final) -> list:
    """One ReqOutput per token; returns the DetokOuts of the rid."""
    outs = []
    for k, tok in enumerate(ids):
        last = k == len(ids) - 1
        out = ReqOutput(rid=rid, new_token_ids=[tok], finished=last, completion_tokens=k + 1,
                        finish_reason=final.get("finish_reason", {"type": "length"}) if last else None)
        data = detok.handle_bytes(encode(BatchOut(outputs=[out])))
        if data is not None:
            outs.extend(decode_tokenizer_manager_input(data).outputs)
    return outs


def test_streaming_deltas_are_utf8_safe(tokenizer):
    text = "héllo wörld — 世界 🙂 ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # The byte-level tokenizer must actually split some character across tokens for this test to bite.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    detok = DetokenizerManager(tokenizer)
    detok.handle_bytes(encode(DetokRegister(req=_req("s", stream=True))))
    outs = _feed(detok, "s", ids)
    deltas = [o.data["text"] for o in outs]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == text
    assert [i for o in outs for i in o.data["output_ids"]] == ids
    assert outs[-1].finished and detok.states == {}


def test_non_streaming_gets_one_result_and_stop_trim(tokenizer):
    ids = tokenizer("abc STOP tail", add_special_tokens=False).input_ids
    detok = DetokenizerManager(tokenizer)
    detok.handle_bytes(encode(DetokRegister(req=_req("n", stream=False, stop=["STOP"]))))
    outs = _feed(detok, "n", ids, finish_reason={"type": "stop", "matched": "STOP"})
    assert [o.data is None for o in outs] == [True] * (len(ids) - 1) + [False]
    assert outs[-1].data["text"] == "abc "
    assert outs[-1].data["meta_info"]["finish_reason"] == {"type": "stop", "matched": "STOP"}


def test_stream_holds_back_a_partial_stop_string(tokenizer):
    ids = tokenizer("abc STOP", add_special_tokens=False).input_ids
    detok = DetokenizerManager(tokenizer)
    detok.handle_bytes(encode(DetokRegister(req=_req("h", stream=True, stop=["STOP"]))))
    outs = _feed(detok, "h", ids, finish_reason={"type": "stop", "matched": "STOP"})
    assert "".join(o.data["text"] for o in outs) == "abc "
    assert all("S" not in o.data["text"] for o in outs)


def test_output_before_registration_waits(tokenizer):
    detok = DetokenizerManager(tokenizer)
    ids = tokenizer("hi", add_special_tokens=False).input_ids
    early = ReqOutput(rid="e", new_token_ids=ids, finished=True, finish_reason={"type": "length"},
                      completion_tokens=len(ids),
                      output_token_logprobs=[TokenLogprob(-0.5, t) for t in ids])
    assert detok.handle_bytes(encode(BatchOut(outputs=[early]))) is None
    req = TokenizedGenerateReq(rid="e", input_ids=[1], sampling_params=SamplingParams(),
                               logprob=LogprobOptions(return_logprob=True, return_text_in_logprobs=True))
    data = detok.handle_bytes(encode(DetokRegister(req=req)))
    (out,) = decode_tokenizer_manager_input(data).outputs
    assert out.data["text"] == "hi"
    assert [e[1] for e in out.data["meta_info"]["output_token_logprobs"]] == ids
    assert all(isinstance(e[2], str) for e in out.data["meta_info"]["output_token_logprobs"])


def test_detokenizer_answers_garbage_and_forwards_others(tokenizer):
    detok = DetokenizerManager(tokenizer)
    for bad in (b"", b"\xc1", pickle.dumps({"x": 1}), json.dumps({"type": "BatchOut"}).encode()):
        reply = decode_tokenizer_manager_input(detok.handle_bytes(bad))
        assert isinstance(reply, ErrorOut) and "malformed" in reply.message
    flush = encode(FlushCacheOut(success=True))
    assert detok.handle_bytes(flush) == flush  # forwarded unchanged
    # stats are forwarded with what the detokenizer itself still tracks
    reply = decode_tokenizer_manager_input(detok.handle_bytes(encode(StatsOut(stats={"a": 1}))))
    assert reply.stats == {"a": 1, "detokenizer_states": 0, "detokenizer_pending": 0}


def test_native_streamer_builds_sglang_chunks():
    acc = NativeStreamer()
    acc.add({"text": "ab", "output_ids": [1], "meta_info": {"completion_tokens": 1, "output_token_logprobs": [[-1, 1, None]]}})
    chunk = acc.add({"text": "c", "output_ids": [2], "meta_info": {"completion_tokens": 2,
                                                                   "output_token_logprobs": [[-2, 2, None]]}})
    assert chunk == {"text": "abc", "output_ids": [1, 2],
                     "meta_info": {"completion_tokens": 2, "output_token_logprobs": [[-1, 1, None], [-2, 2, None]],
                                   "output_token_logprobs_length": 2}}


@pytest.mark.parametrize("body,param", [
    ({"text": 5}, "text"),
    ({"input_ids": ["a"]}, "input_ids"),
    ({"text": "x", "return_logprob": "yes"}, "return_logprob"),
    ({"text": "x", "stream": 1}, "stream"),
    ({"text": "x", "bogus": 1}, "bogus"),
    ([1, 2], None),
])
def test_native_body_type_errors_name_the_field(body, param):
    with pytest.raises(RequestError) as ei:
        parse_generate_body(body)
    assert ei.value.status == 400
    if param:
        assert param in str(ei.value)


def test_response_format_maps_to_sampling_fields():
    from radixlm.runtime.constrained import JSON_OBJECT_SCHEMA

    assert constrained_sampling_fields(None, None) == {}
    assert constrained_sampling_fields(ResponseFormat(type="text"), None) == {}
    assert constrained_sampling_fields(ResponseFormat(type="json_object"), None) == {"json_schema": JSON_OBJECT_SCHEMA}
    assert constrained_sampling_fields(None, "a+") == {"regex": "a+"}
    rf = ResponseFormat(type="json_schema", json_schema={"name": "x", "schema": {"type": "integer"}})
    assert constrained_sampling_fields(rf, None) == {"json_schema": '{"type": "integer"}'}
    with pytest.raises(RequestError, match="mutually exclusive"):
        constrained_sampling_fields(rf, "a+")


def test_server_args_cli_round_trip():
    from radixlm.runtime.server.launcher import make_parser

    args = ServerArgs(model_path="/m", device="cpu", max_total_tokens=1234, api_key="k", enable_jump_forward=False,
                      disable_radix_cache=True, log_interval_s=0.5, schedule_policy="fcfs")
    parsed = make_parser().parse_args(server_args_to_argv(args))
    assert ServerArgs.from_cli_args(parsed) == args
    assert isinstance(make_parser(), argparse.ArgumentParser)


def test_load_chat_template(tmp_path):
    from radixlm.runtime.prompt_format import load_chat_template

    tpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(tpl)
    (tmp_path / "t.json").write_text(json.dumps({"chat_template": tpl}))
    assert load_chat_template(str(tmp_path / "t.jinja")) == tpl
    assert load_chat_template(str(tmp_path / "t.json")) == tpl
    assert load_chat_template(tpl) == tpl
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="chat_template"):
        load_chat_template("no-such-template")
