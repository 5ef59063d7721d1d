"""Logprobs are numbers, always: tokens that jump-forward forces in sampled requests get the model's real
logprob and top_logprobs, the same numbers a teacher-forced scoring of the output gives."""

from __future__ import annotations

import pytest

from radixlm.runtime.engine import Engine
from tests.constrained_cases import REGEX_CASES, schema_json

PROMPT = "Answer: "


@pytest.fixture(scope="module")
def engine(make_model):
    eng = Engine(model_path=make_model("llama"), dtype="float32", device="cpu", max_total_tokens=16384,
                 max_running_requests=128, random_seed=1)
    yield eng
    eng.shutdown()


def _sampled(engine, field, pattern, n, top=3, max_new_tokens=48):
    return engine.generate(PROMPT, {field: pattern, "temperature": 1.0, "n": n, "max_new_tokens": max_new_tokens,
                                    "seed": 5}, return_logprob=True, top_logprobs_num=top)


def test_no_null_logprob_in_200_sampled_constrained_requests(engine):
    # 32 tokens reach the forced runs of both patterns (keys and punctuation) and keep the test fast.
    outs = (_sampled(engine, "json_schema", schema_json("person"), 100, max_new_tokens=32)
            + _sampled(engine, "regex", REGEX_CASES["forced_sentence"], 100, max_new_tokens=32))
    assert len(outs) == 200
    for o in outs:
        mi = o["meta_info"]
        lps, tops = mi["output_token_logprobs"], mi["output_top_logprobs"]
        assert len(lps) == len(o["output_ids"]) == len(tops) == mi["completion_tokens"]
        assert [t for _, t, _ in lps] == o["output_ids"]
        assert all(isinstance(lp, float) for lp, _, _ in lps), lps
        assert all(len(t) == 3 and all(isinstance(x[0], float) for x in t) for t in tops)


@pytest.mark.parametrize("field, pattern", [("json_schema", schema_json("person")),
                                            ("regex", REGEX_CASES["forced_sentence"])])
def test_forced_token_logprobs_equal_teacher_forced_scores(engine, field, pattern):
    """The logprob reported for every output token (sampled or forced) is what scoring the finished
    sequence gives, and its top_logprobs too."""
    outs = _sampled(engine, field, pattern, 8)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    for o in outs:
        scored = engine.generate(input_ids=prompt_ids + o["output_ids"], sampling_params={"max_new_tokens": 0},
                                 return_logprob=True, logprob_start_len=len(prompt_ids), top_logprobs_num=3)
        ref = scored["meta_info"]["input_token_logprobs"]
        got = o["meta_info"]["output_token_logprobs"]
        assert [t for _, t, _ in ref] == [t for _, t, _ in got]
        assert [lp for lp, _, _ in got] == pytest.approx([lp for lp, _, _ in ref], abs=1e-4)
        ref_top = scored["meta_info"]["input_top_logprobs"]
        for a, b in zip(o["meta_info"]["output_top_logprobs"], ref_top):
            assert [t for _, t, _ in a] == [t for _, t, _ in b]


def test_logprobs_do_not_change_what_is_sampled(engine):
    """Holding forced tokens back for scoring leaves the sampled output as it is without logprobs."""
    sp = {"json_schema": schema_json("person"), "temperature": 1.0, "n": 6, "max_new_tokens": 48, "seed": 9}
    with_lp = engine.generate(PROMPT, sp, return_logprob=True)
    without = engine.generate(PROMPT, sp)
    assert [o["output_ids"] for o in with_lp] == [o["output_ids"] for o in without]


def test_dsl_meta_info_and_streamed_native_logprobs_are_numbers(engine):
    import radixlm as sgl
    from radixlm.backend.engine_backend import EngineBackend

    @sgl.function
    def prog(s):
        s += PROMPT + sgl.gen("x", json_schema=schema_json("person"), max_tokens=48, temperature=1.0,
                              return_logprob=True, top_logprobs_num=2)

    for seed in range(4):
        st = prog.run(backend=EngineBackend(engine), seed=seed)
        meta = st.get_meta_info("x")
        assert meta["output_token_logprobs"] and all(isinstance(e[0], float) for e in meta["output_token_logprobs"])
        assert all(t and all(isinstance(x[0], float) for x in t) for t in meta["output_top_logprobs"])
    chunks = list(engine.generate(PROMPT, {"regex": REGEX_CASES["forced_sentence"], "temperature": 1.0,
                                           "max_new_tokens": 48, "seed": 2}, return_logprob=True, stream=True))
    lps = [e for c in chunks for e in c["meta_info"]["output_token_logprobs"]]
    assert lps and all(isinstance(e[0], float) for e in lps)
