"""The language against a live tiny model, in-process (``EngineBackend`` over ``radixlm.runtime.Engine``).

One engine for the module; the KV invariant is checked after every test.
"""

from __future__ import annotations

import asyncio
import math

import pytest

import radixlm as sgl
from radixlm.backend.engine_backend import EngineBackend
from radixlm.interpreter import ProgramError

PREFIX = (
    "You are a careful assistant who answers questions about colours, numbers and animals. "
    "Answer in a single short sentence and do not repeat the question.\n"
)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from radixlm.runtime.engine import Engine

    eng = Engine(model_path=tiny_llama, random_seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def backend(engine):
    return EngineBackend(engine)


@pytest.fixture(autouse=True)
def _kv_invariant(engine):
    yield
    engine.check_memory()


def _ids(engine, text):
    return engine.tokenizer(text).input_ids


def _greedy(engine, text, **sp):
    return engine.generate(text, {"temperature": 0.0, "stop": ["<|im_end|>"], "stop_token_ids": [4], **sp})


# --------------------------------------------------------------------------- gen
def test_gen_returns_at_once_and_reading_waits(backend, engine):
    seen = {}

    @sgl.function
    def story(s):
        s += "Once upon a time"
        s += sgl.gen("story", max_tokens=64, ignore_eos=True)
        seen["done_right_after_append"] = s.stream_executor.var_done("story")
        seen["value"] = s["story"]  # waits

    st = story.run(backend=backend, temperature=0)
    assert seen["done_right_after_append"] is False
    assert st["story"] == seen["value"] and st["story"]
    assert st.text() == "Once upon a time" + st["story"]
    # The interpreter sent exactly this request: same text as calling the engine directly.
    assert st["story"] == _greedy(engine, "Once upon a time", max_new_tokens=64, ignore_eos=True)["text"]
    meta = st.get_meta_info("story")
    assert 0 < meta["completion_tokens"] <= 64 and meta["prompt_tokens"] == len(_ids(engine, "Once upon a time"))


def test_gen_sampling_fields_logprobs_and_n(backend):
    @sgl.function
    def prog(s):
        s += "Numbers:" + sgl.gen("a", max_tokens=5, return_logprob=True, top_logprobs_num=2)
        s += "\nTwo samples:" + sgl.gen("b", max_tokens=4, n=2, temperature=1.0, seed=7)
        s += "\nStop:" + sgl.gen("c", max_tokens=3, min_tokens=3, ignore_eos=True)

    st = prog.run(backend=backend, temperature=0)
    assert st.error() is None
    meta = st.get_meta_info("a")
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])
    assert isinstance(st["b"], list) and len(st["b"]) == 2
    assert st.get_meta_info("c")["completion_tokens"] == 3


# --------------------------------------------------------------------------- roles
def test_roles_write_the_model_chat_template_and_messages(backend, engine):
    @sgl.function
    def chat(s, question):
        s += sgl.system("Be brief.")
        with s.user():
            s += question
        s += sgl.assistant(sgl.gen("first", max_tokens=6))
        s += sgl.user_begin() + "And then?" + sgl.user_end()
        s += sgl.assistant_begin()
        s += sgl.gen("second", max_tokens=6)
        s += sgl.assistant_end()

    st = chat.run("What is red?", backend=backend, temperature=0)
    msgs = st.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == "What is red?" and msgs[2]["content"] == st["first"].lstrip()
    tok = engine.tokenizer
    rendered = tok.apply_chat_template(
        [{"role": m["role"], "content": c} for m, c in zip(msgs, ["Be brief.", "What is red?", st["first"],
                                                                   "And then?", st["second"]])],
        tokenize=False,
    )
    assert st.text() == rendered[len(tok.bos_token):]
    html = st._repr_html_()
    assert "rl-gen" in html and ">assistant<" in html and 'title="gen: first"' in html


def test_nested_roles_raise_value_error_from_run(backend):
    @sgl.function
    def bad(s):
        s += sgl.user_begin()
        s += sgl.assistant_begin()

    with pytest.raises(ValueError, match="nested roles"):
        bad.run(backend=backend)


# --------------------------------------------------------------------------- select
SELECT_PROMPT = "Question: which colour is the sky on a clear day?\nAnswer:"
SELECT_CHOICES = [" blue", " green", " red and orange at sunset", "purple"]


def _choice_logprobs(engine, prompt, choice):
    """Logprobs of the choice's tokens, scored on their own (full recompute, no cache sharing)."""
    prefix_ids = _ids(engine, prompt)
    out = engine.generate(prompt + choice, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    entries = out["meta_info"]["input_token_logprobs"]
    full_ids = [e[1] for e in entries]
    k = 0
    while k < len(prefix_ids) and full_ids[k] == prefix_ids[k]:
        k += 1
    return entries[k:]


def _unconditional(engine, ids):
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    return [0.0 if e[0] is None else e[0] for e in out["meta_info"]["input_token_logprobs"]]


@pytest.mark.parametrize("method_name", ["token_length_normalized", "greedy_token_selection",
                                         "unconditional_likelihood_normalized"])
def test_select_matches_a_decision_recomputed_from_separate_requests(backend, engine, method_name):
    method = getattr(sgl, method_name)

    @sgl.function
    def pick(s):
        s += SELECT_PROMPT + sgl.select("colour", choices=SELECT_CHOICES, choices_method=method)

    st = pick.run(backend=backend)
    decision = st["colour"]
    assert st.text() == SELECT_PROMPT + decision
    meta = st.get_meta_info("colour")

    separate = [_choice_logprobs(engine, SELECT_PROMPT, c) for c in SELECT_CHOICES]
    lps = [[e[0] for e in ent] for ent in separate]
    for got, want in zip(meta["input_token_logprobs"], separate):
        assert [e[1] for e in got] == [e[1] for e in want]  # the same tokens were scored
        assert [e[0] for e in got] == pytest.approx([e[0] for e in want], abs=1e-3)
    if method_name == "token_length_normalized":
        scores = [sum(x) / len(x) for x in lps]
        expected = SELECT_CHOICES[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    elif method_name == "greedy_token_selection":
        width = max(len(x) for x in lps)
        rows = [x + [sum(x) / len(x)] * (width - len(x)) for x in lps]
        alive = list(range(len(rows)))
        for j in range(width):
            best = max(rows[i][j] for i in alive)
            alive = [i for i in alive if math.isclose(rows[i][j], best, abs_tol=1e-6)]
            if len(alive) == 1:
                break
        expected = SELECT_CHOICES[alive[0]]
    else:
        scores = []
        for ent, x in zip(separate, lps):
            u = _unconditional(engine, [e[1] for e in ent])
            scores.append(sum(a - b for a, b in zip(x, u)) / len(x))
        expected = SELECT_CHOICES[max(range(len(scores)), key=lambda i: (scores[i], -i))]
    assert decision == expected


def test_select_scores_all_choices_in_one_request_after_the_prefix_is_cached(backend, engine):
    sgl.flush_cache(backend)
    calls = []
    original = backend._request

    def spy(data):
        calls.append(data)
        return original(data)

    backend._request = spy
    try:
        @sgl.function
        def pick(s):
            s += PREFIX + "Pick one:" + sgl.select("x", choices=[" cat", " dog", " horse"])

        st = pick.run(backend=backend)
        assert st.error() is None
    finally:
        del backend._request
    assert len(calls) == 2  # commit the prefix, then one batch for every choice
    assert calls[1]["text"][1:] == [PREFIX + "Pick one:" + c for c in (" cat", " dog", " horse")]


# --------------------------------------------------------------------------- fork / join
def test_fork_gather_variable_and_prefix_computed_once(backend, engine):
    @sgl.function
    def tips(s):
        s += PREFIX + "Here are three tips."
        forks = s.fork(3)
        forks += lambda i: f"\nTip {i + 1}:" + sgl.gen("tip", max_tokens=6)
        forks.join()
        s["branches"] = [f.text() for f in forks]

    sgl.flush_cache(backend)
    st = tips.run(backend=backend, temperature=0)
    assert st.error() is None
    assert st.text() == PREFIX + "Here are three tips."  # gather leaves the parent's text alone
    assert isinstance(st["tip"], list) and len(st["tip"]) == 3
    for i, text in enumerate(st["branches"]):
        assert text == PREFIX + "Here are three tips." + f"\nTip {i + 1}:" + st["tip"][i]
    n_prefix = len(_ids(engine, PREFIX + "Here are three tips."))
    # Every branch found the committed prefix in the radix cache.
    assert st.stream_executor.children[0].meta_info["tip"]["cached_tokens"] >= n_prefix - 1


def test_fork_concate_and_append_and_list_appends(backend):
    @sgl.function
    def prog(s):
        s += "Start."
        forks = s.fork(2)
        forks += [" left:", " right:"]
        forks += sgl.gen("g", max_tokens=4)
        forks.join("concate_and_append")
        s += " End."

    st = prog.run(backend=backend, temperature=0)
    final = st.text()  # waits for the join, which waits for the branches
    added = [k.text()[len("Start."):] for k in st.stream_executor.children]
    assert added[0].startswith(" left:") and added[1].startswith(" right:")
    assert final == "Start." + added[0] + added[1] + " End."


def test_copy_var_scope_and_variable_access(backend):
    @sgl.function
    def prog(s):
        with s.var_scope("scoped"):
            s += "abc" + sgl.gen("g", max_tokens=4)
        with s.copy() as c:
            c += " copy:" + sgl.gen("in_copy", max_tokens=3)

    st = prog.run(backend=backend, temperature=0)
    assert st["scoped"] == "abc" + st["g"]
    assert "g" in st and "scoped" in st and "nope" not in st
    assert isinstance(st["in_copy"], list) and len(st["in_copy"]) == 1
    with pytest.raises(KeyError):
        st["nope"]
    st["mine"] = 5
    assert st["mine"] == 5


def test_state_can_be_continued_after_run(backend):
    @sgl.function
    def prog(s):
        s += sgl.user("hi") + sgl.assistant(sgl.gen("a", max_tokens=3))

    st = prog.run(backend=backend, temperature=0)
    st += sgl.user("more") + sgl.assistant(sgl.gen("b", max_tokens=3, temperature=0))
    assert [m["role"] for m in st.messages()] == ["user", "assistant", "user", "assistant"]
    assert st.text().endswith(st["b"] + "<|im_end|>\n")


# --------------------------------------------------------------------------- streaming
@sgl.function
def streamed(s):
    s += "The quick brown fox"
    s += sgl.gen("tail", max_tokens=24, ignore_eos=True)
    s += "."


def test_streamed_text_equals_final_text(backend):
    reference = streamed.run(backend=backend, temperature=0).text()
    st = streamed.run(backend=backend, temperature=0, stream=True)
    chunks = list(st.text_iter())
    assert "".join(chunks) == st.text() == reference
    assert len(chunks) > 2  # it really streamed

    st = streamed.run(backend=backend, temperature=0, stream=True)
    assert "".join(st.text_iter("tail")) == st["tail"]

    async def collect():
        st2 = streamed.run(backend=backend, temperature=0, stream=True)
        return [c async for c in st2.text_async_iter()]

    assert "".join(asyncio.run(collect())) == reference


# --------------------------------------------------------------------------- batch
@sgl.function
def batch_qa(s, i):
    s += sgl.system(PREFIX * 3)
    s += sgl.user("Question number " + i + ": what comes next?")
    s += sgl.assistant(sgl.gen("answer", max_tokens=4))


def test_run_batch_of_64_in_order_with_the_shared_prefix_computed_once(backend, engine):
    sgl.flush_cache(backend)
    before = backend.get_server_info()["scheduler_stats"]
    states = batch_qa.run_batch([{"i": str(k)} for k in range(64)], backend=backend, temperature=0,
                                progress_bar=True)
    after = backend.get_server_info()["scheduler_stats"]
    assert len(states) == 64
    for k, st in enumerate(states):
        assert st.error() is None
        assert f"Question number {k}:" in st.text()  # results come back in input order
    tpl = backend.get_chat_template()
    shared = tpl.role_prefix_and_suffix["system"][0] + PREFIX * 3 + tpl.role_prefix_and_suffix["system"][1]
    n_shared = len(_ids(engine, shared))
    # Every program found the shared prefix cached (the warm-up computed it, once).
    assert all(st.get_meta_info("answer")["cached_tokens"] >= n_shared - 1 for st in states)
    computed = after["total_computed_prompt_tokens"] - before["total_computed_prompt_tokens"]
    unique = sum(st.get_meta_info("answer")["prompt_tokens"] - n_shared for st in states)
    assert computed < 2 * n_shared + unique  # computing the prefix a second time would exceed this
    assert after["cache_hit_rate"] > 0.5


def test_run_batch_with_positional_tuples_and_one_thread(backend):
    states = batch_qa.run_batch([("a",), ("b",)], backend=backend, num_threads=1, max_new_tokens=2)
    assert ["Question number a" in states[0].text(), "Question number b" in states[1].text()] == [True, True]


def test_cache_sends_the_constant_prefix(backend, engine):
    sgl.flush_cache(backend)
    prefix = batch_qa.cache(backend=backend)
    assert prefix is not None and PREFIX in prefix
    st = batch_qa.run(i="7", backend=backend, max_new_tokens=2)
    assert st.get_meta_info("answer")["cached_tokens"] >= len(_ids(engine, prefix)) - 1


# --------------------------------------------------------------------------- errors
def test_backend_error_surfaces_without_hanging(backend):
    @sgl.function
    def too_long(s):
        s += "word " * 3000  # beyond the tiny model's 2048-token context
        s += sgl.gen("x", max_tokens=4)
        s += sgl.gen("y", max_tokens=4)

    st = too_long.run(backend=backend)
    assert st.error() is not None
    with pytest.raises(ProgramError):
        st["x"]
    with pytest.raises(ProgramError):
        st["y"]
    assert st.text().startswith("word ")
    st2 = too_long.run(backend=backend, stream=True)
    assert "".join(st2.text_iter()).startswith("word ")  # the stream ends
    assert st2.error() is not None


def test_program_exceptions_raise_from_run_and_stay_in_their_state_in_batches(backend):
    @sgl.function
    def maybe_fail(s, k):
        s += "k=" + k + sgl.gen("g", max_tokens=2)
        if k == "1":
            raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError, match="tool failed"):
        maybe_fail.run(k="1", backend=backend)
    states = maybe_fail.run_batch([{"k": "0"}, {"k": "1"}, {"k": "2"}], backend=backend)
    assert states[0].error() is None and states[2].error() is None
    assert isinstance(states[1].error(), RuntimeError)


def test_failed_branch_fails_the_parent_at_join(backend):
    @sgl.function
    def prog(s):
        s += "x"
        forks = s.fork(2)
        forks += ["ok" + sgl.gen("v", max_tokens=2), "word " * 3000 + sgl.gen("v", max_tokens=2)]
        forks.join()
        s += sgl.gen("after", max_tokens=2)

    st = prog.run(backend=backend)
    assert isinstance(st.error(), ProgramError)
    with pytest.raises(ProgramError):
        st["after"]


# --------------------------------------------------------------------------- module API
def test_default_backend_flush_cache_and_server_info(engine):
    sgl.set_default_backend(engine)  # an Engine is wrapped automatically
    try:
        assert sgl.flush_cache()["success"] is True
        info = sgl.get_server_info()
        assert "cache_hit_rate" in info["scheduler_stats"] and info["model_path"]

        @sgl.function
        def prog(s):
            s += "Hi" + sgl.gen("x", max_tokens=2)

        assert prog.run().error() is None
        assert prog().error() is None  # calling the function runs it
    finally:
        sgl.set_default_backend(None)


def test_regex_dtype_and_json_schema_constrain_gen(backend):
    import json

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}

    @sgl.function
    def extract(s):
        s += "Code: " + sgl.gen("code", regex=r"[A-Z]{3}-[0-9]{2}", max_tokens=16)
        s += "\nCount: " + sgl.gen_int("count", max_tokens=6)
        s += "\nFlag: " + sgl.gen("flag", dtype=bool, max_tokens=4)
        s += "\nJSON: " + sgl.gen("obj", json_schema=schema, max_tokens=64)

    st = extract.run(backend=backend, temperature=0)
    assert st.error() is None, st.error()
    import re

    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", st["code"])
    int(st["count"].strip())
    assert st["flag"] in ("True", "False")
    obj = json.loads(st["obj"])
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int)
