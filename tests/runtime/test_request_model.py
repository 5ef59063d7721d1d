"""The one definition of each request concept: GenerateReqInput (every front door's request model),
LogprobOptions (DSL, protocol, Req), RequestState's meta_info (final results and stream deltas), and
the dtype table. Fast: no model forward."""

from __future__ import annotations

import msgspec
import pytest

import radixlm as sgl
from radixlm.runtime.dtypes import DTYPE_CHOICES, dtype_name, resolve_dtype, torch_dtype
from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.protocol import LogprobOptions, ReqOutput, TokenizedGenerateReq, TokenLogprob, encode
from radixlm.runtime.request_state import RequestState
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.server.native_stream import NativeStreamer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from radixlm.runtime.hf_tokenizer import load_tokenizer

    return load_tokenizer(tiny_llama)


# --------------------------------------------------------------------------- GenerateReqInput
@pytest.mark.parametrize("body,field", [
    ({"text": 5}, "text"),
    ({"input_ids": ["a"]}, "input_ids"),
    ({"input_ids": [[1], ["x"]]}, "input_ids"),
    ({"text": "x", "sampling_params": [1]}, "sampling_params"),
    ({"text": "x", "return_logprob": "yes"}, "return_logprob"),
    ({"text": "x", "top_logprobs_num": 1.5}, "top_logprobs_num"),
    ({"text": "x", "stream": 1}, "stream"),
    ({"text": "x", "bogus": 1}, "bogus"),
])
def test_from_dict_names_the_field(body, field):
    with pytest.raises(ValueError) as ei:
        GenerateReqInput.from_dict(body)
    assert str(ei.value).startswith(f"{field}: "), str(ei.value)


def test_from_dict_rejects_a_non_object():
    with pytest.raises(ValueError, match="must be an object"):
        GenerateReqInput.from_dict([1, 2])


def test_normalize_folds_logprob_fields_into_one_options_struct_per_sequence(tokenizer):
    obj = GenerateReqInput.from_dict({
        "text": ["a", "b"], "return_logprob": [True, False], "logprob_start_len": [0, 1],
        "top_logprobs_num": 2, "return_text_in_logprobs": True,
    })
    a, b = obj.normalize(tokenizer)
    assert a.logprob == LogprobOptions(return_logprob=True, logprob_start_len=0, top_logprobs_num=2,
                                       return_text_in_logprobs=True)
    assert b.logprob.return_logprob is False and b.logprob.logprob_start_len == 1
    # The options travel inside the wire struct and come back equal.
    assert msgspec.msgpack.decode(encode(a), type=TokenizedGenerateReq).logprob == a.logprob
    with pytest.raises(ValueError, match="logprob_start_len"):
        GenerateReqInput.from_dict({"text": "a", "logprob_start_len": -2}).normalize(tokenizer)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from radixlm.runtime.engine import Engine

    eng = Engine(model_path=tiny_llama, dtype="float32", device="cpu", max_total_tokens=512)
    yield eng
    eng.shutdown()


def test_engine_generate_uses_the_same_checks(engine):
    with pytest.raises(ValueError, match="^top_logprobs_num: "):
        engine.generate("x", {"max_new_tokens": 1}, return_logprob=True, top_logprobs_num="3")
    with pytest.raises(ValueError, match="^text: "):
        engine.generate(7, {"max_new_tokens": 1})
    out = engine.generate("x", SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True))
    assert out["meta_info"]["completion_tokens"] == 2


# --------------------------------------------------------------------------- LogprobOptions
def test_logprob_options_validate_by_name_and_omit_defaults():
    assert LogprobOptions().to_dict() == {}
    opts = LogprobOptions.from_dict({"return_logprob": True, "logprob_start_len": None})
    assert opts.to_dict() == {"return_logprob": True}
    assert opts.replace(top_logprobs_num=3).top_logprobs_num == 3
    assert LogprobOptions(logprob_start_len=4, top_logprobs_num=2).for_scheduler() == LogprobOptions()
    for bad, field in (({"top_logprobs_num": -1}, "top_logprobs_num"), ({"return_logprob": 1}, "return_logprob"),
                       ({"logprobs": True}, "logprobs")):
        with pytest.raises(ValueError, match=field):
            LogprobOptions.from_dict(bad)


def test_dsl_gen_checks_logprob_options_at_the_call():
    with pytest.raises(ValueError, match="top_logprobs_num"):
        sgl.gen("x", return_logprob=True, top_logprobs_num=-2)
    g = sgl.gen("x", return_logprob=True, top_logprobs_num=2)
    assert g.logprob == {"return_logprob": True, "top_logprobs_num": 2}


# --------------------------------------------------------------------------- meta_info, one builder
def _outputs(ids: list[int]) -> list[ReqOutput]:
    outs = []
    for k, t in enumerate(ids):
        last = k == len(ids) - 1
        outs.append(ReqOutput(
            rid="r", new_token_ids=[t], finished=last, completion_tokens=k + 1, prompt_tokens=3,
            finish_reason={"type": "length"} if last else None,
            input_token_logprobs=[TokenLogprob(None, 1), TokenLogprob(-0.5, 2)] if k == 0 else None,
            input_top_logprobs=[None, [TokenLogprob(-0.5, 2)]] if k == 0 else None,
            output_token_logprobs=[TokenLogprob(-0.1 * (k + 1), t)],
            output_top_logprobs=[[TokenLogprob(-0.1 * (k + 1), t)]],
        ))
    return outs


@pytest.mark.parametrize("with_text", [False, True])
def test_accumulated_stream_deltas_equal_the_final_result(tokenizer, with_text):
    ids = tokenizer("hello there world", add_special_tokens=False).input_ids
    req = TokenizedGenerateReq(
        rid="r", input_ids=[1, 2, 3], sampling_params=SamplingParams(), stream=True,
        logprob=LogprobOptions(return_logprob=True, logprob_start_len=1, top_logprobs_num=1,
                               return_text_in_logprobs=with_text))
    streamed, final = RequestState(req, tokenizer), RequestState(req, tokenizer)
    acc = NativeStreamer()
    for out in _outputs(ids):
        sent = len(streamed.stream_text())
        streamed.update(out)
        chunk = acc.add(streamed.delta(out, sent))
        final.update(out)
    assert chunk["meta_info"].pop("output_token_logprobs_length") == len(ids)
    assert chunk == final.result()
    meta = chunk["meta_info"]
    assert [e[1] for e in meta["output_token_logprobs"]] == ids
    assert meta["input_top_logprobs"][0] is None
    assert all((e[2] is not None) == with_text for e in meta["output_token_logprobs"])


# --------------------------------------------------------------------------- dtypes
def test_one_dtype_table():
    import torch

    from radixlm.runtime.server_args import ServerArgs

    assert ServerArgs.__dataclass_fields__["dtype"].metadata["choices"] == DTYPE_CHOICES
    assert {torch_dtype(n) for n in DTYPE_CHOICES if n != "auto"} == {torch.float32, torch.bfloat16, torch.float16}
    assert torch_dtype("bf16") is torch.bfloat16 and dtype_name(torch.float16) == "float16"

    class Cfg:
        torch_dtype = "bfloat16"

    assert resolve_dtype("auto", Cfg()) is torch.bfloat16
    assert resolve_dtype(None, object()) is torch.float32
    assert resolve_dtype(torch.float16, Cfg()) is torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float64", Cfg())
