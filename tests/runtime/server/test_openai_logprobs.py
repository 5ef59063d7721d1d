"""Completions logprobs and echo scoring, built by the OpenAI layer from Engine results (the server runs the
same functions on the same results): token strings join to the text, text_offset points into it, the
server-added BOS is in neither, add_special_tokens is honoured, and the scores equal transformers'."""

from __future__ import annotations

import pytest
import torch

from radixlm.runtime.engine import Engine
from radixlm.runtime.server.openai_api import completion_response, prepare_completion
from radixlm.runtime.server.openai_protocol import CompletionRequest

PROMPT = "Hello world é 🙂 — naïve 日本語 x"


@pytest.fixture(scope="module")
def engine(make_model):
    eng = Engine(model_path=make_model("llama"), dtype="float32", device="cpu", max_total_tokens=4096)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(make_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(make_model("llama"), torch_dtype=torch.float32).eval()


def _complete(engine, **body) -> dict:
    req = CompletionRequest(model="m", **body)
    prep = prepare_completion(req, engine.tokenizer, {"context_length": 512}, "m")
    o = prep.obj
    res = engine.generate(input_ids=o.input_ids, sampling_params=o.sampling_params, return_logprob=o.return_logprob,
                          logprob_start_len=o.logprob_start_len, top_logprobs_num=o.top_logprobs_num,
                          return_text_in_logprobs=True)
    return completion_response(prep, req, res if isinstance(res, list) else [res], engine.tokenizer)


def _hf_scores(hf_model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def _check_offsets(choice: dict) -> None:
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    pos = 0
    for tok, off in zip(lp["tokens"], lp["text_offset"]):
        assert off == pos
        pos += len(tok)


def test_echo_string_prompt_tokens_join_to_text_without_server_bos(engine, hf_model):
    out = _complete(engine, prompt=PROMPT, echo=True, logprobs=2, max_tokens=5, temperature=0)
    c = out["choices"][0]
    assert c["text"].startswith(PROMPT) and "<s>" not in c["text"]
    _check_offsets(c)
    plain = engine.tokenizer(PROMPT, add_special_tokens=False).input_ids
    lp = c["logprobs"]
    echoed = lp["token_logprobs"][: len(plain)]
    # The BOS the server added is not echoed, so even the first prompt token has its score (given BOS).
    assert all(isinstance(x, float) for x in lp["token_logprobs"])
    bos = engine.tokenizer.bos_token_id
    assert echoed == pytest.approx(_hf_scores(hf_model, [bos] + plain), abs=1e-4)
    assert len(lp["tokens"]) == len(plain) + out["usage"]["completion_tokens"]
    assert out["usage"]["prompt_tokens"] == len(plain) + 1  # usage still counts what the model read
    assert all(t is not None and 1 <= len(t) <= 2 for t in lp["top_logprobs"][1:])


def test_add_special_tokens_false_scores_the_bare_prompt(engine, hf_model):
    """lm-eval with tokenized_requests=False: the string is scored as the client's tokenizer sees it."""
    out = _complete(engine, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1, temperature=0,
                    add_special_tokens=False)
    c = out["choices"][0]
    _check_offsets(c)
    plain = engine.tokenizer(PROMPT, add_special_tokens=False).input_ids
    assert out["usage"]["prompt_tokens"] == len(plain)
    lps = c["logprobs"]["token_logprobs"]
    assert lps[0] is None  # nothing before the first token scores it (OpenAI and vLLM report null too)
    assert lps[1 : len(plain)] == pytest.approx(_hf_scores(hf_model, plain), abs=1e-4)


def test_echo_token_prompt_echoes_every_token_it_was_given(engine, hf_model):
    """lm-eval's default path (token ids, echo, logprobs=1): exact scores, the client's BOS in text and tokens."""
    ids = [engine.tokenizer.bos_token_id] + engine.tokenizer("The cat sat on the mat", add_special_tokens=False).input_ids
    out = _complete(engine, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    c = out["choices"][0]
    _check_offsets(c)
    lp = c["logprobs"]
    assert lp["tokens"][0] == "<s>" and c["text"].startswith("<s>The cat")
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(_hf_scores(hf_model, ids), abs=1e-4)


def test_offsets_without_echo_and_batched_prompts(engine):
    out = _complete(engine, prompt=["naïve 日本", "🙂🙂"], logprobs=0, max_tokens=6, temperature=0.8, seed=1, n=2)
    assert len(out["choices"]) == 4
    for c in out["choices"]:
        _check_offsets(c)
        assert c["logprobs"]["top_logprobs"] is None
        assert len(c["logprobs"]["tokens"]) == 6 or c["finish_reason"] == "stop"
    echo = _complete(engine, prompt=["naïve 日本", "🙂🙂"], echo=True, max_tokens=2, temperature=0)
    assert [c["text"][: len(p)] for c, p in zip(echo["choices"], ["naïve 日本", "🙂🙂"])] == ["naïve 日本", "🙂🙂"]


def test_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(engine, hf_model):
    """lm-eval's loglikelihood request shape (echo, logprobs, max_tokens=0): the prompt alone, scored."""
    out = _complete(engine, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    c = out["choices"][0]
    assert c["text"] == PROMPT and out["usage"]["completion_tokens"] == 0
    _check_offsets(c)
    plain = engine.tokenizer(PROMPT, add_special_tokens=False).input_ids
    bos = engine.tokenizer.bos_token_id
    assert c["logprobs"]["token_logprobs"] == pytest.approx(_hf_scores(hf_model, [bos] + plain), abs=1e-4)
    assert c["finish_reason"] == "length"
