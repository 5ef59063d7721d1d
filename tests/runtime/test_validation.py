"""runtime/validation.py: every front door's one set of checks.

The issue's reproductions (values that crashed the sampler or the msgpack encoder) must be a ValueError
naming the field, through the Engine (and so the DSL); a hypothesis fuzz over the request fields
asserts that nothing but ValueError ever comes out, and that whatever is accepted can be encoded for
the socket and sampled without an exception.
"""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from radixlm.runtime.engine import Engine
from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.hf_tokenizer import load_tokenizer
from radixlm.runtime.protocol import encode
from radixlm.runtime.req import Req
from radixlm.runtime.device_sampler import DeviceSampler, SamplingBatch
from radixlm.runtime.sampler import Sampler
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.validation import RequestLimits, check_admission, check_requests

BIG = 18446744073709551615  # 2**64 - 1: the issue's top_k


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=2048, max_n=8,
                 max_prompts_per_request=16)
    yield eng
    eng.shutdown()


ISSUE_CASES = [
    ({"sampling_params": {"max_new_tokens": 4, "top_k": BIG}}, "top_k"),
    ({"sampling_params": {"max_new_tokens": 4, "min_new_tokens": 2, "stop_token_ids": [1000000]}}, "stop_token_ids"),
    ({"sampling_params": {"max_new_tokens": 4, "stop_token_ids": [-1]}}, "stop_token_ids"),
    ({"sampling_params": {"max_new_tokens": 4, "seed": 2**70}}, "seed"),
    ({"sampling_params": {"max_new_tokens": BIG * 4}}, "max_new_tokens"),
    ({"sampling_params": {"max_new_tokens": 4, "stop": ["ok", "\ud800"]}}, r"stop\[1\]"),
    ({"sampling_params": {"max_new_tokens": 4, "regex": "a\udfff"}}, "regex"),
    ({"sampling_params": {"max_new_tokens": 4, "temperature": float("inf")}}, "temperature"),
    ({"sampling_params": {"max_new_tokens": 4, "logit_bias": {10**9: 1.0}}}, "logit_bias"),
    ({"sampling_params": {"n": 9}}, "n"),
    ({"prompt": ["a"] * 17}, "text"),
    ({"prompt": ["a"] * 4, "sampling_params": {"n": 5}}, "n"),
    ({"prompt": None, "input_ids": [1, 2**64]}, "input_ids"),
    ({"prompt": "hi \ud800 there"}, "text"),
    ({"prompt": "word " * 20000}, "text: 100000 characters cannot fit"),  # refused before tokenizing
    ({"rid": "x\ud800"}, "rid"),
    ({"sampling_params": {"json_schema": '{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000}},
     "json_schema: nested deeper"),  # was a RecursionError
    ({"rid": "r" * 600}, "rid"),
    ({"return_logprob": True, "logprob_start_len": 2**70}, "logprob_start_len"),
    ({"return_logprob": True, "top_logprobs_num": 2**70}, "top_logprobs_num"),
    ({"return_logprob": True, "top_logprobs_num": -1}, "top_logprobs_num"),
]


@pytest.mark.parametrize("kwargs, field", ISSUE_CASES)
def test_issue_inputs_are_value_errors_naming_the_field(engine, kwargs, field):
    kwargs = {"prompt": "Hello world", **kwargs}
    with pytest.raises(ValueError, match=field):
        engine.generate(**kwargs)
    ok = engine.generate("Hello world", {"temperature": 0, "max_new_tokens": 2})
    assert ok["meta_info"]["completion_tokens"] == 2


def test_limits_come_from_the_flags(tiny_llama):
    args = ServerArgs(model_path=tiny_llama, max_n=3, max_prompts_per_request=5, max_prompt_tokens=7)
    lim = RequestLimits.from_args(args, vocab_size=100, context_len=50)
    assert (lim.max_n, lim.max_prompts_per_request, lim.max_prompt_tokens) == (3, 5, 7)
    assert RequestLimits.from_args(args.replace(max_prompt_tokens=0), 100, 50).max_prompt_tokens == 50
    assert RequestLimits.from_args(args.replace(max_prompt_tokens=90), 100, 50).max_prompt_tokens == 50
    with pytest.raises(ValueError, match="max_n"):
        ServerArgs(model_path=tiny_llama, max_n=0)


def test_oversized_requests_cost_no_tokenization():
    """n and prompt counts are checked on the raw request: the tokenizer is never called."""

    class NoTokenizer:
        def __call__(self, *a, **k):
            raise AssertionError("tokenized an oversized request")

    lim = RequestLimits(vocab_size=100, context_len=64, max_n=4, max_prompts_per_request=8,
                        max_sequences_per_request=8, max_prompt_tokens=64, max_prompt_chars=1000)
    for obj in (GenerateReqInput(text="x", sampling_params={"n": 20000}),
                GenerateReqInput(text="y" * 1001),
                GenerateReqInput(text=["x"] * 100),
                GenerateReqInput(text=["x"] * 4, sampling_params=[{"n": 3}] * 4)):
        with pytest.raises(ValueError, match="n|text"):
            check_admission(obj, lim)
            obj.normalize(NoTokenizer())


# --------------------------------------------------------------------------- fuzz
_edge_ints = st.one_of(st.integers(min_value=-(2**80), max_value=2**80),
                       st.sampled_from([-1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**6]))
_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12)
_junk = st.one_of(st.none(), st.booleans(), _edge_ints, st.floats(allow_nan=True), _text,
                  st.lists(_edge_ints, max_size=3), st.dictionaries(_text, _edge_ints, max_size=2))


def mostly(valid, weight: int = 4):
    """Plausible values most of the time (so requests get accepted and run), anything now and then."""
    return st.one_of(*([valid] * weight), _junk)


_tok_id = st.one_of(st.integers(0, 1535), _edge_ints)
_sp = st.fixed_dictionaries({}, optional={
    "max_new_tokens": mostly(st.integers(0, 8)), "min_new_tokens": mostly(st.integers(0, 3)),
    "temperature": mostly(st.floats(0, 3)), "top_p": mostly(st.floats(0.01, 1)),
    "top_k": mostly(st.one_of(st.integers(-1, 2000), _edge_ints)), "min_p": mostly(st.floats(0, 1)),
    "frequency_penalty": mostly(st.floats(-2, 2)), "presence_penalty": mostly(st.floats(-2, 2)),
    "repetition_penalty": mostly(st.floats(0.1, 2)),
    "stop": mostly(st.one_of(_text, st.lists(_text, max_size=3))),
    "stop_token_ids": mostly(st.lists(_tok_id, max_size=4)), "ignore_eos": mostly(st.booleans()),
    "n": mostly(st.integers(1, 5)), "seed": mostly(st.one_of(st.none(), st.integers(0, 2**70))),
    "logit_bias": mostly(st.dictionaries(_tok_id, st.floats(-100, 100), max_size=3)),
    "regex": st.sampled_from([None, "a+", "[0-9]{1,3}", "(", "\ud800"]),
})
_req = st.fixed_dictionaries({}, optional={
    "text": mostly(st.one_of(_text, st.lists(_text, min_size=0, max_size=3))),
    "input_ids": mostly(st.one_of(st.lists(_tok_id, max_size=5), st.lists(st.lists(_tok_id, max_size=3), max_size=3))),
    "sampling_params": mostly(st.one_of(_sp, st.lists(_sp, max_size=3))),
    "rid": mostly(st.one_of(st.none(), _text, st.lists(_text, max_size=3))),
    "return_logprob": mostly(st.booleans()), "logprob_start_len": mostly(st.integers(-1, 4)),
    "top_logprobs_num": mostly(st.integers(0, 5)),
})
# Well-formed shapes, edge values: where the issue's crashes lived (types right, integers out of range).
_sp_values = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.one_of(st.integers(0, 8), _edge_ints), "min_new_tokens": st.integers(0, 3),
    "temperature": st.floats(0, 3), "top_k": st.one_of(st.integers(-1, 2000), _edge_ints),
    "stop": st.lists(_text, max_size=3), "stop_token_ids": st.lists(_tok_id, max_size=4),
    "seed": st.one_of(st.integers(0, 2**70), _edge_ints), "n": st.integers(1, 5),
    "logit_bias": st.dictionaries(_tok_id, st.floats(-100, 100), max_size=3),
    "repetition_penalty": st.floats(0.5, 2), "frequency_penalty": st.floats(-2, 2),
})
_wellformed = st.fixed_dictionaries(
    {"text": st.one_of(_text.filter(bool), st.lists(_text.filter(bool), min_size=1, max_size=3)),
     "sampling_params": _sp_values},
    optional={"return_logprob": st.booleans(), "logprob_start_len": st.one_of(st.integers(-1, 3), _edge_ints),
              "top_logprobs_num": st.one_of(st.integers(0, 5), _edge_ints), "rid": _text},
)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.mark.slow  # 600 examples, ~6 s
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=st.one_of(_req, _wellformed))
def test_fuzz_only_value_errors_and_accepted_requests_run(tok, body):
    """Whatever the fields hold: ValueError, or requests that encode for the socket and sample cleanly."""
    vocab = 1536  # the tiny model's
    lim = RequestLimits(vocab_size=vocab, context_len=256, max_n=4, max_prompts_per_request=8,
                        max_sequences_per_request=8, max_prompt_tokens=256)
    try:
        obj = GenerateReqInput.from_dict(body)
        check_admission(obj, lim)
        reqs = obj.normalize(tok)
        check_requests(reqs, lim)
    except ValueError:
        event("rejected")
        return
    event("accepted")
    sampler = Sampler(vocab, {0})  # the host reference
    device_sampler = DeviceSampler(vocab, "cpu")  # what the scheduler samples with
    for r in reqs:
        msgspec.msgpack.decode(encode(r))  # the encoder accepts everything validation accepted
        req = Req(rid=r.rid, input_ids=r.input_ids, sampling_params=r.sampling_params,
                  logprob=r.logprob)
        logits = torch.randn(1, vocab)
        sampler(logits, [req])  # the two crashes of the issue lived here
        device_sampler(logits, SamplingBatch.build([req], [0], vocab, [0], "cpu"))
