"""The OpenAI routes of a live server on the tiny model, through the official ``openai`` client: model
names (404 model_not_found, /v1/models/{id}, the "default" alias), echo scoring streamed and not."""

from __future__ import annotations

import os

import openai
import pytest
import requests

from radixlm.runtime.server import Runtime
from radixlm.runtime.server_args import ServerArgs

pytestmark = pytest.mark.slow  # starts a server


@pytest.fixture(scope="module")
def rt(tiny_llama):
    runtime = Runtime(model_path=tiny_llama, device="cpu", max_total_tokens=4096, log_level="warning",
                      log_interval_s=0.0)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="module")
def oai(rt):
    return openai.OpenAI(base_url=rt.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_served_model_name_defaults_to_the_directory_name(tiny_llama):
    assert ServerArgs(model_path=tiny_llama + "/").model_id == os.path.basename(tiny_llama)
    assert ServerArgs(model_path=tiny_llama, served_model_name="my-model").model_id == "my-model"


def test_model_names(rt, oai):
    name = os.path.basename(rt.server_args.model_path)
    assert [m.id for m in oai.models.list().data] == [name]
    assert oai.models.retrieve(name).id == name
    for alias in (name, "default", rt.server_args.model_path):
        c = oai.completions.create(model=alias, prompt="Hi", max_tokens=2, temperature=0)
        assert c.model == name
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    body = e.value.response.json()["error"]
    assert body["code"] == "model_not_found" and body["param"] == "model" and "gpt-4o" in body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="x", max_tokens=2)
    r = requests.get(rt.url + "/v1/models/nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert oai.completions.create(model="default", prompt="x", max_tokens=1).choices  # nothing disturbed


def test_echo_streamed_equals_whole(oai):
    kw = dict(model="default", prompt="Hello wörld 🙂", max_tokens=6, temperature=0, echo=True, logprobs=2)
    whole = oai.completions.create(**kw).choices[0]
    chunks = list(oai.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert text == whole.text and text.startswith("Hello wörld 🙂")
    assert tokens == whole.logprobs.tokens and "".join(tokens) == text
    assert offsets == whole.logprobs.text_offset
    assert all(isinstance(x, float) for x in whole.logprobs.token_logprobs)


def test_nothing_silently_ignored(rt, oai):
    msgs = [{"role": "user", "content": "x"}]
    for field, value in [("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
                         ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "low")]:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="default", messages=msgs, max_tokens=2, extra_body={field: value})
        assert e.value.response.json()["error"]["param"] == field
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="default", messages=msgs, max_tokens=2, store=True)
    assert e.value.response.json()["error"]["param"] == "store"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="default", prompt="x", max_tokens=2, stream_options={"include_usage": True})
    assert e.value.response.json()["error"]["param"] == "stream_options"
    ok = oai.chat.completions.create(model="default", messages=msgs, max_tokens=2, modalities=["text"],
                                     metadata={"k": "v"}, user="u1", extra_body={"not_a_field": 1})
    assert ok.choices[0].message.content is not None


def test_continuous_usage_stats(oai):
    chunks = list(oai.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "x"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    usages = [c.usage for c in chunks]
    assert all(u is not None for u in usages)
    completion = [u.completion_tokens for u in usages]
    assert completion == sorted(completion) and completion[-1] == 6 and not chunks[-1].choices
    assert len({u.prompt_tokens for u in usages}) == 1


def _check_tagged(text: str, begin: str, end: str, allowed: set) -> int:
    """Text outside the tags is free; inside each tag the JSON is one of ``allowed`` (the last tag may be cut
    by max_tokens: then a prefix of one). Returns the number of complete tags."""
    import json
    import re

    complete = 0
    rest = text
    while begin in rest:
        _, _, after = rest.partition(begin)
        body, found, rest = after.partition(end)
        if not found:
            assert any(json.dumps(a, separators=(",", ":")).startswith(re.sub(r"\s", "", body)) for a in allowed), body
            return complete
        assert json.loads(body) in [dict(a) for a in allowed], body
        complete += 1
    return complete


def test_structural_tag_response_format(rt, oai, tiny_llama):
    """SGLang's response_format structural_tag, both forms, through the openai client: the trigger opens
    the structure, whose JSON matches the schema; with xgrammar's format form the tag is required."""
    from transformers import AutoTokenizer

    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"],
              "additionalProperties": False}
    allowed = [{"a": 1}, {"a": 2}]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    lt = tok.convert_tokens_to_ids("<")
    # no whitespace tokens, so the random model cannot pad JSON with whitespace until max_tokens runs out
    bias = {str(i): -100 for i in range(len(tok)) if tok.decode([i]) and not tok.decode([i]).strip()}
    legacy = {"type": "structural_tag", "structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}],
              "triggers": ["<"]}
    # a strong bias on "<" makes the model fire the trigger; the grammar then forces the rest
    c = oai.completions.create(model="default", prompt="call:", max_tokens=40, temperature=0,
                               extra_body={"response_format": legacy}, logit_bias={**bias, str(lt): 50})
    text = c.choices[0].text
    assert text.startswith("<f>") and _check_tagged(text, "<f>", "</f>", allowed) >= 1, text
    assert "<" not in text.replace("<f>", "").replace("</f>", ""), text  # every "<" opened a structure
    fmt = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "const_string", "value": "Result: "},
        {"type": "tag", "begin": "<r>", "content": {"type": "json_schema", "json_schema": schema}, "end": "</r>"}]}}
    msg = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "go"}],
                                      max_tokens=40, temperature=0, response_format=fmt, logit_bias=bias)
    content = msg.choices[0].message.content
    assert content.startswith("Result: <r>") and _check_tagged(content, "<r>", "</r>", allowed) == 1, content
    s = oai.completions.create(model="default", prompt="x", max_tokens=40, temperature=0.9, seed=1,
                               extra_body={"structural_tag": fmt})  # SGLang's sampling-field name, as on /generate
    assert s.choices[0].text.startswith("Result: <r>")
    for bad, param in (({"type": "structural_tag"}, "response_format"),
                       ({**legacy, "at_least_one": True}, "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model="default", prompt="x", max_tokens=2, extra_body={"response_format": bad})
        assert e.value.response.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="default", prompt="x", max_tokens=2,
                               extra_body={"response_format": legacy, "regex": "a+"})
    assert oai.completions.create(model="default", prompt="x", max_tokens=1).choices  # nothing disturbed
