"""Constrained decoding through the Engine: sampled outputs always match, jump-forward is exact for greedy."""

from __future__ import annotations

import json
import threading

import pytest

from radixlm.runtime.engine import Engine
from radixlm.runtime.protocol import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.server_args import ServerArgs
from tests.tiers import fast_subset
from tests.constrained_cases import BAD_REGEXES, BAD_SCHEMAS, JSON_SCHEMA_CASES, REGEX_CASES, output_is_valid, schema_json

SAMPLES = 100


@pytest.fixture(scope="module")
def engine(make_model):
    eng = Engine(model_path=make_model("llama"), dtype="float32", device="cpu", max_total_tokens=16384,
                 max_running_requests=128, random_seed=1)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def engine_no_jf(make_model):
    eng = Engine(model_path=make_model("llama"), dtype="float32", device="cpu", max_total_tokens=8192,
                 enable_jump_forward=False)
    yield eng
    eng.shutdown()


def _check_samples(engine, kind, pattern, sp_field):
    outs = engine.generate(
        "Answer: ", {sp_field: pattern, "temperature": 1.0, "n": SAMPLES, "max_new_tokens": 96, "seed": 3}
    )
    finished = [o for o in outs if o["meta_info"]["finish_reason"]["type"] == "stop"]
    bad = [o["text"] for o in finished if not output_is_valid(kind, pattern, o["text"])]
    assert not bad, bad[:3]
    assert len(finished) >= SAMPLES // 10, f"only {len(finished)} of {SAMPLES} finished"
    for o in outs:  # a cut-off output reports "length"
        if o not in finished:
            assert o["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("name", fast_subset(sorted(REGEX_CASES), set(REGEX_CASES) - {"ipv4"}))
def test_regex_samples_always_match(engine, name):
    _check_samples(engine, "regex", REGEX_CASES[name], "regex")


@pytest.mark.parametrize("name", fast_subset(sorted(JSON_SCHEMA_CASES),
                                             ["const_and_bool", "optional_fields", "enums", "any_of_nullable"]))
def test_json_schema_samples_always_validate(engine, name):
    _check_samples(engine, "json", schema_json(name), "json_schema")


@pytest.mark.parametrize("case", fast_subset(["regex:ipv4", "regex:forced_sentence", "regex:semver", "json:person",
                                              "json:nested_objects", "json:array_min_max"],
                                             ["regex:ipv4", "regex:forced_sentence", "regex:semver",
                                              "json:array_min_max"]))
def test_jump_forward_is_exact_for_greedy(engine, engine_no_jf, case):
    kind, name = case.split(":")
    pattern = REGEX_CASES[name] if kind == "regex" else schema_json(name)
    field = "regex" if kind == "regex" else "json_schema"
    prompts = ["Answer: ", "The result is", "{"]
    sp = {field: pattern, "temperature": 0, "max_new_tokens": 80}
    with_jf = engine.generate(prompts, sp, return_logprob=True)
    without = engine_no_jf.generate(prompts, sp, return_logprob=True)
    for a, b in zip(with_jf, without):
        assert a["output_ids"] == b["output_ids"]
        assert a["text"] == b["text"]
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
        la = [x[0] for x in a["meta_info"]["output_token_logprobs"]]
        lb = [x[0] for x in b["meta_info"]["output_token_logprobs"]]
        assert la == pytest.approx(lb, abs=1e-4)
        if a["meta_info"]["finish_reason"]["type"] == "stop":
            assert output_is_valid(kind, pattern, a["text"])


def test_jump_forward_saves_forward_passes(make_model):
    """Sampled requests take forced text whole; the outputs stay valid and fewer passes run."""
    pattern = schema_json("person")
    passes = {}
    for jf in (False, True):
        with Engine(model_path=make_model("llama"), dtype="float32", device="cpu", max_total_tokens=8192,
                    enable_jump_forward=jf, constrained_json_whitespace_pattern="") as eng:
            outs = eng.generate(["Person: "] * 8, {"json_schema": pattern, "temperature": 1.0, "max_new_tokens": 96, "seed": 1})
            for o in outs:
                if o["meta_info"]["finish_reason"]["type"] == "stop":
                    assert output_is_valid("json", pattern, o["text"])
            passes[jf] = eng.get_server_info()["scheduler_stats"]["num_forward_passes"]
            eng.check_memory()
    assert passes[True] < passes[False]


@pytest.mark.parametrize("field, value", [("regex", v) for v in list(BAD_REGEXES.values())[:3]]
                         + [("json_schema", v) for v in list(BAD_SCHEMAS.values())[:3]])
def test_bad_pattern_rejected_while_others_finish(engine, field, value):
    result = {}

    def good():
        result["out"] = engine.generate("Hello", {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})

    t = threading.Thread(target=good)
    t.start()
    with pytest.raises(ValueError, match=field):
        engine.generate("Hello", {field: value, "max_new_tokens": 8})
    t.join(timeout=120)
    assert result["out"]["meta_info"]["completion_tokens"] == 24


def test_constraints_with_stop_and_streaming(engine):
    pattern = REGEX_CASES["forced_sentence"]
    sp = {"regex": pattern, "temperature": 0, "max_new_tokens": 60}
    final = engine.generate("Q: ", sp)
    chunks = list(engine.generate("Q: ", sp, stream=True))
    assert chunks[-1]["text"] == final["text"]
    stopped = engine.generate("Q: ", {**sp, "stop": [","]})
    assert "," not in stopped["text"] and final["text"].startswith(stopped["text"])
    cut = engine.generate("Q: ", {**sp, "max_new_tokens": 3})
    assert cut["meta_info"]["finish_reason"]["type"] == "length"
    assert len(cut["output_ids"]) == 3


def test_json_object_and_pydantic_schema(engine):
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int

    sp = SamplingParams.from_dict({"json_schema": Point, "temperature": 0, "max_new_tokens": 40})
    out = engine.generate("Point: ", sp.to_dict())
    if out["meta_info"]["finish_reason"]["type"] == "stop":
        Point.model_validate_json(out["text"])
    from radixlm.runtime.constrained import JSON_OBJECT_SCHEMA

    objs = engine.generate("Obj: ", {"json_schema": json.dumps(JSON_OBJECT_SCHEMA) if not isinstance(JSON_OBJECT_SCHEMA, str)
                                     else JSON_OBJECT_SCHEMA, "temperature": 1.0, "n": 10, "max_new_tokens": 60, "seed": 2})
    for o in objs:
        if o["meta_info"]["finish_reason"]["type"] == "stop":
            assert isinstance(json.loads(o["text"]), dict)


def test_slow_compile_does_not_stall_decoding(make_model):
    args = ServerArgs(model_path=make_model("llama"), dtype="float32", device="cpu", max_total_tokens=2048)
    sched = Scheduler(args)
    sched.add_request(TokenizedGenerateReq(rid="free", input_ids=[1, 20, 30, 40],
                                           sampling_params=SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True)))
    sched.add_request(TokenizedGenerateReq(rid="slow", input_ids=[1, 20, 30],
                                           sampling_params=SamplingParams(regex="(a|b)*a(a|b){14}", max_new_tokens=4)))
    slow = next(r for r in sched.waiting if r.rid == "slow")
    free_tokens = 0
    while not slow.grammar.ready:  # still compiling
        for out in sched.step():
            if out.rid == "free":
                free_tokens += len(out.new_token_ids)
        if free_tokens >= 400:
            break
    assert free_tokens >= 3, "the free request did not decode while the grammar compiled"
    while sched.has_work():
        sched.step()
    sched.check_memory()


def test_min_new_tokens_never_outranks_a_finished_grammar(engine):
    # After "red" the grammar admits only EOS, which min_new_tokens would ban: the grammar wins.
    out = engine.generate("Color: ", {"regex": "(red|green|blue)", "min_new_tokens": 20, "max_new_tokens": 30,
                                      "temperature": 1.0, "seed": 4})
    assert out["text"] in ("red", "green", "blue")
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
