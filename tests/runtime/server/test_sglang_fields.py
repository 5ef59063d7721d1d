"""SGLang 0.5's request fields and launch flags on radixlm (no SGLang package needed): stop_regex,
sampling_seed, stream_interval, custom_params, max_new_tokens=0 as prefill-only, the /generate
top-level fields, the OpenAI extras, the launch flags, and the native stream's chunk shapes."""

from __future__ import annotations

import re

import pytest

from radixlm.runtime.engine import Engine
from radixlm.runtime.sampling_params import UNBOUNDED, SamplingParams
from radixlm.runtime.server.native_stream import NativeStreamer
from radixlm.runtime.server.openai_extras import check_refused, sglang_fields
from radixlm.runtime.sglang_compat import split_sglang_extras
from tests.tiers import fast_subset

PROMPT = "hello world, this is"


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=4096)
    yield eng
    eng.shutdown()


# ----------------------------------------------------------------------------- SamplingParams
def test_sglang_sampling_fields_are_one_definition():
    sp = SamplingParams.from_dict({"stop_regex": r"a\d{2}", "sampling_seed": 7, "custom_params": {"k": 1},
                                   "stream_interval": 4})
    assert sp.stop_regex == [r"a\d{2}"] and sp.seed == 7 and sp.stream_interval == 4
    assert sp.stop_regex_window == 3
    assert SamplingParams.from_dict({"stop_regex": [r"\d+"]}).stop_regex_window == UNBOUNDED
    assert SamplingParams.from_dict({"stop_regex": []}).stop_regex is None  # SGLang's frontend sends []
    assert SamplingParams.from_dict({"sampling_seed": 3, "seed": 3}).seed == 3


@pytest.mark.parametrize("bad, field", [
    ({"stop_regex": "("}, "stop_regex"),
    ({"sampling_seed": 1, "seed": 2}, "sampling_seed"),
    ({"stream_interval": 0}, "stream_interval"),
    ({"regex": "a", "ebnf": "root ::= \"a\""}, "regex and ebnf"),
    ({"structural_tag": "{"}, "structural_tag"),
    ({"stop_regex": ["a"] * 17}, "stop_regex"),
])
def test_bad_sglang_sampling_fields_name_the_field(bad, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        SamplingParams.from_dict(bad)


def test_stop_regex_stops_and_trims_like_stop(engine):
    free = engine.generate(PROMPT, {"max_new_tokens": 40, "temperature": 0})["text"]
    pattern = r"[a-z]{2} "
    m = re.search(pattern, free)
    assert m, free  # the tiny model's greedy text has a two-letter word end somewhere
    res = engine.generate(PROMPT, {"max_new_tokens": 40, "temperature": 0, "stop_regex": pattern})
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    assert res["text"] == free[: m.start()]
    kept = engine.generate(PROMPT, {"max_new_tokens": 40, "temperature": 0, "stop_regex": pattern,
                                    "no_stop_trim": True})
    assert re.search(pattern, kept["text"]) and kept["text"].startswith(res["text"])
    # streamed text never has to be taken back: every chunk extends the previous one
    chunks = [c["text"] for c in engine.generate(PROMPT, {"max_new_tokens": 40, "temperature": 0,
                                                          "stop_regex": pattern}, stream=True)]
    joined = ""
    for c in chunks:
        assert c.startswith(joined) or joined == ""
        joined = c
    assert chunks[-1] == res["text"]


def test_max_new_tokens_zero_is_prefill_only(engine):
    res = engine.generate(PROMPT, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    meta = res["meta_info"]
    assert res["text"] == "" and res["output_ids"] == []
    assert meta["completion_tokens"] == 0 and meta["finish_reason"] == {"type": "length", "length": 0}
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["output_token_logprobs"] == []
    engine.check_memory()


def test_max_new_tokens_zero_in_the_dsl(engine):
    import radixlm as sgl

    @sgl.function
    def prog(s):
        s += PROMPT + sgl.gen("x", max_tokens=0)

    state = prog.run(backend=engine)
    assert state["x"] == "" and state.get_meta_info("x")["completion_tokens"] == 0


# ----------------------------------------------------------------------------- /generate body
def test_null_sglang_fields_are_dropped_and_real_values_refused():
    body = {"text": "hi", "lora_path": None, "session_id": None, "return_hidden_states": False,
            "return_routed_experts": False, "lora_id": [None, None], "log_metrics": True, "rid": "r"}
    assert split_sglang_extras(body) == {"text": "hi", "rid": "r"}
    for field, value in (("lora_path", "adapter"), ("return_hidden_states", True), ("session_id", "s1"),
                         ("image_data", "x.png")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            split_sglang_extras({"text": "hi", field: value})
    assert "bogus" in split_sglang_extras({"bogus": 1})  # not SGLang's: left for the request model to refuse


def test_parse_generate_body_applies_the_rules():
    from radixlm.runtime.server.native_api import parse_generate_body
    from radixlm.runtime.server.request_errors import RequestError

    obj = parse_generate_body({"text": "hi", "sampling_params": {"stop_regex": []}, "lora_path": None})
    assert obj.text == "hi"
    with pytest.raises(RequestError) as e:
        parse_generate_body({"text": "hi", "lora_path": "a"})
    assert e.value.param == "lora_path" and e.value.status == 400
    with pytest.raises(RequestError, match="bogus"):
        parse_generate_body({"text": "hi", "bogus": None})
    assert parse_generate_body({"text": "hi", "token_ids_logprob": [1, 2]}).token_ids_logprob == [1, 2]
    with pytest.raises(RequestError) as e:
        parse_generate_body({"text": "hi", "token_ids_logprob": [1, "a"]})
    assert e.value.param == "token_ids_logprob" and e.value.status == 400


# ----------------------------------------------------------------------------- OpenAI extras
def test_openai_extras_map_to_sampling_fields():
    assert sglang_fields({"stop_regex": "a", "include_stop_str_in_output": True, "ebnf": None}) == {
        "stop_regex": "a", "no_stop_trim": True}
    assert sglang_fields({"ebnf": 'root ::= "a"', "sampling_seed": 3}) == {"ebnf": 'root ::= "a"', "sampling_seed": 3}
    with pytest.raises(ValueError, match="^use_beam_search"):
        check_refused({"use_beam_search": True})
    check_refused({"use_beam_search": False, "prompt_logprobs": None})
    with pytest.raises(ValueError, match="^stream_interval: .*/generate"):  # not silently dropped
        check_refused({"stream_interval": 4})


# ----------------------------------------------------------------------------- launch flags
def test_sglang_launch_flags():
    from radixlm.runtime.server.launcher import make_parser

    p = make_parser()
    a = p.parse_args(["--model-path", "m", "--enable-metrics", "--cuda-graph-max-bs", "8",
                      "--incremental-streaming-output", "--mem-fraction-static", "0.3", "--log-level", "warning",
                      "--grammar-backend", "outlines", "--stream-interval", "2"])
    assert a.incremental_streaming_output and a.mem_fraction_static == 0.3 and a.stream_interval == 2
    assert [n.split(":")[0] for n in a._sglang_noted_flags] == ["--enable-metrics", "--cuda-graph-max-bs 8"]
    a = p.parse_args(["--model-path", "m", "--enable-priority-scheduling", "--schedule-low-priority-values-first",
                      "--default-priority-value", "3", "--disable-priority-preemption"])
    assert a.enable_priority_scheduling and a.schedule_low_priority_values_first and a.default_priority_value == 3
    assert [n.split(":")[0] for n in a._sglang_noted_flags] == ["--disable-priority-preemption"]
    for argv in (["--model-path", "m", "--no-such-flag"], ["--model-path", "m", "--quantization", "fp8"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)


# ----------------------------------------------------------------------------- stream chunks
def _deltas():
    meta = lambda n, fr=None: {"completion_tokens": n, "finish_reason": fr,  # noqa: E731
                               "output_token_logprobs": [(-0.5, n, None)]}
    return [{"text": "a", "output_ids": [1], "meta_info": meta(1)},
            {"text": "b", "output_ids": [2], "meta_info": meta(2)},
            {"text": "c", "output_ids": [3], "meta_info": meta(3, {"type": "length", "length": 3})}]


def test_native_stream_cumulative_and_incremental():
    s = NativeStreamer()
    cum = [s.add(d) for d in _deltas()]
    assert [c["text"] for c in cum] == ["a", "ab", "abc"]
    assert [c["meta_info"]["output_token_logprobs_length"] for c in cum] == [1, 2, 3]
    assert len(cum[-1]["meta_info"]["output_token_logprobs"]) == 3
    s = NativeStreamer(incremental=True)
    inc = [s.add(d) for d in _deltas()]
    assert [c["text"] for c in inc] == ["a", "b", "c"] and [c["output_ids"] for c in inc] == [[1], [2], [3]]
    assert [len(c["meta_info"]["output_token_logprobs"]) for c in inc] == [1, 1, 1]
    assert [c["meta_info"]["output_token_logprobs_length"] for c in inc] == [1, 2, 3]


def test_stream_interval_merges_chunks_and_always_sends_the_last():
    s = NativeStreamer(incremental=True, interval=2)
    out = [s.add(d) for d in _deltas()]
    assert out[0] is None
    assert out[1]["text"] == "ab" and len(out[1]["meta_info"]["output_token_logprobs"]) == 2
    assert out[2]["text"] == "c" and out[2]["meta_info"]["finish_reason"] is not None


# ----------------------------------------------------------------------------- server routes
@pytest.fixture(scope="module")
def server(tiny_llama):
    from radixlm.runtime.server.runtime_handle import Runtime

    rt = Runtime(model_path=tiny_llama, device="cpu", max_total_tokens=8192, log_level="warning")
    yield rt
    rt.shutdown()


@pytest.mark.slow
def test_sglang_routes(server):
    import requests

    from tests.server_helpers import check_kv_invariant

    u = server.url
    ids = requests.post(u + "/v1/tokenize", json={"prompt": "hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0
    assert requests.post(u + "/v1/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"].endswith("hello world")
    enc = requests.post(u + "/encode", json={"text": "x"})
    assert enc.status_code == 400 and "generation model" in enc.json()["error"]["message"]
    assert requests.post(u + "/abort_request", json={"abort_all": True}).json()["success"] is True
    cat = requests.post(u + "/concate_and_append_request", json={"src_rids": ["a", "b"], "dst_rid": "c"})
    assert cat.status_code == 200
    assert requests.post(u + "/concate_and_append_request", json={"src_rids": "a"}).status_code == 400
    info = requests.get(u + "/get_server_info").json()
    assert info["max_total_num_tokens"] == 8192 and info["max_req_input_len"] > 0
    assert info["internal_states"][0]["memory_usage"]["token_capacity"] == 8192
    assert requests.get(u + "/model_info").json()["architectures"] == ["LlamaForCausalLM"]
    # SGLang's Runtime.generate body: null lora_path/session_id accepted; a real adapter refused by name
    ok = requests.post(u + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2, "stop_regex": []},
                                             "lora_path": None, "session_id": None})
    assert ok.status_code == 200, ok.text
    no = requests.post(u + "/generate", json={"text": "hi", "lora_path": "my-adapter"})
    assert no.status_code == 400 and no.json()["error"]["param"] == "lora_path"
    # OpenAI: output-changing extras honoured or refused
    model = requests.get(u + "/v1/models").json()["data"][0]["id"]
    base = {"model": model, "prompt": "hello", "max_tokens": 8, "temperature": 0}
    r = requests.post(u + "/v1/completions", json={**base, "guided_choice": ["yes", "no"]}).json()
    assert r["choices"][0]["text"] in ("yes", "no")
    beam = requests.post(u + "/v1/completions", json={**base, "use_beam_search": True})
    assert beam.status_code == 400 and beam.json()["error"]["param"] == "use_beam_search"
    sr = requests.post(u + "/v1/completions", json={**base, "max_tokens": 24, "stop_regex": r"[a-z]{2} "}).json()
    assert sr["choices"][0]["finish_reason"] == "stop" and sr["choices"][0]["matched_stop"] == r"[a-z]{2} "
    echo = requests.post(u + "/v1/completions", json={**base, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    assert echo["usage"]["completion_tokens"] == 0 and echo["choices"][0]["text"] == "hello"
    # torch profiler in the scheduler: start, some work, stop writes a Chrome trace
    import json as _json
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert requests.post(u + "/start_profile", json={"output_dir": d}).status_code == 200
        assert requests.post(u + "/start_profile").status_code == 400  # already running
        requests.post(u + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 4}})
        stop = requests.get(u + "/stop_profile").json()  # SGLang's RuntimeEndpoint uses GET
        with open(stop["message"]) as f:
            assert _json.load(f)["traceEvents"]
        assert requests.post(u + "/stop_profile").status_code == 400
    check_kv_invariant(u)


@pytest.mark.parametrize("pattern, stripped", [
    (r"^user@example\.com$", r"user@example\.com"),
    (r"^(Hello|Hi|Hey)$", r"(Hello|Hi|Hey)"),
    (r"^a$|^b$", "a|b"),
    (r"a\$", r"a\$"),  # an escaped dollar is a character
    (r"a\\$", r"a\\"),  # an escaped backslash, then the anchor
    (r"[$^]", r"[$^]"),
    (r"(a|^b)", r"(a|^b)"),  # inside a group an anchor means something else: left to the compiler
])
def test_end_anchors_have_sglang_meaning(pattern, stripped):
    from radixlm.runtime.constrained import validate_grammar
    from radixlm.runtime.constrained.patterns import strip_end_anchors

    assert strip_end_anchors(pattern) == stripped
    if "(a|^b)" != pattern:
        validate_grammar("regex", pattern)


def test_anchored_regex_constrains_generation(engine):
    res = engine.generate("Email:", {"max_new_tokens": 16, "temperature": 0, "regex": r"^user@example\.com$"})
    assert res["text"] == "user@example.com" and res["meta_info"]["finish_reason"]["type"] == "stop"


# ----------------------------------------------------------------------------- CFG grammars (xgrammar)
EBNF = 'root ::= "The answer is " ("yes" | "no") "." | "[" num ("," num)* "]"\nnum ::= [0-9]+'


@pytest.mark.parametrize("temperature", fast_subset([0.0, 0.9], [0.0]))
def test_ebnf_constrains_and_jump_forward_keeps_greedy_output(tiny_llama, engine, temperature):
    import regex as re_partial

    allowed = r"The answer is (yes|no)\.|\[[0-9]+(,[0-9]+)*\]"
    sp = {"max_new_tokens": 24, "temperature": temperature, "ebnf": EBNF, "seed": 5}
    res = engine.generate(["Q: is it?\nA:", "list:", "numbers"], sp)
    no_jf = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=4096,
                   enable_jump_forward=False)
    try:
        plain = no_jf.generate(["Q: is it?\nA:", "list:", "numbers"], sp)
        no_jf.check_memory()
    finally:
        no_jf.shutdown()
    for r, p in zip(res, plain):
        text, fr = r["text"], r["meta_info"]["finish_reason"]
        if fr["type"] == "stop":
            assert re.fullmatch(allowed, text), text
        else:
            assert re_partial.fullmatch(allowed, text, partial=True), text
        if temperature == 0.0:
            assert r["output_ids"] == p["output_ids"]  # jump-forward never changes greedy output
    engine.check_memory()


@pytest.mark.slow
def test_structural_tag_and_backend_selection(tiny_llama, engine):
    import json

    tag = {"type": "structural_tag", "triggers": ["<f>"],
           "structures": [{"begin": "<f>", "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                     "required": ["a"]}, "end": "</f>"}]}
    res = engine.generate("call: <f>", {"max_new_tokens": 12, "temperature": 0, "structural_tag": json.dumps(tag)})
    assert res["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    with pytest.raises(ValueError, match="^ebnf: "):
        engine.generate("x", {"ebnf": "root ::= ("})
    with pytest.raises(ValueError, match="structures"):
        engine.generate("x", {"structural_tag": json.dumps({"type": "structural_tag", "structures": [{}],
                                                            "triggers": ["a"]})})
    outlines_only = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=2048,
                           grammar_backend="outlines")
    xgr_only = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=2048,
                      grammar_backend="xgrammar")
    try:
        with pytest.raises(ValueError, match="^ebnf: .*--grammar-backend"):
            outlines_only.generate("x", {"max_new_tokens": 4, "ebnf": 'root ::= "a"'})
        r = xgr_only.generate("Email:", {"max_new_tokens": 16, "temperature": 0, "regex": r"^user@example\.com$"})
        assert r["text"] == "user@example.com"
        outlines_only.check_memory()
        xgr_only.check_memory()
    finally:
        outlines_only.shutdown()
        xgr_only.shutdown()


def test_engine_stream_interval(engine):
    sp = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    every = list(engine.generate(PROMPT, sp, stream=True))
    fours = list(engine.generate(PROMPT, {**sp, "stream_interval": 4}, stream=True))
    assert [c["meta_info"]["completion_tokens"] for c in fours] == [4, 8, 10]
    assert fours[-1]["text"] == every[-1]["text"]


def test_engine_generate_takes_sglang_arguments(engine):
    out = engine.generate(PROMPT, {"max_new_tokens": 2}, lora_path=None, return_hidden_states=False)
    assert out["meta_info"]["completion_tokens"] == 2
    with pytest.raises(ValueError, match="^lora_path: "):
        engine.generate(PROMPT, {"max_new_tokens": 2}, lora_path="adapter")
    with pytest.raises(ValueError, match="bogus"):
        engine.generate(PROMPT, {"max_new_tokens": 2}, bogus=1)
