"""OpenAI request fields that need no server: vLLM's guided-decoding fields map onto SamplingParams
fields, conflicting constraints and unsupported grammars are 400s (never ignored)."""

from __future__ import annotations

import json
import re

import pytest

from radixlm.runtime.server.openai_fields import constrained_sampling_fields, vllm_guided_fields
from radixlm.runtime.server.openai_protocol import ResponseFormat
from radixlm.runtime.server.request_errors import RequestError


def test_vllm_guided_fields_map_to_sampling_fields():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert vllm_guided_fields({"guided_json": schema}) == {"json_schema": json.dumps(schema)}
    assert vllm_guided_fields({"guided_regex": "a+"}) == {"regex": "a+"}
    choice = vllm_guided_fields({"guided_choice": ["yes", "no (maybe)"]})["regex"]
    assert re.fullmatch(choice, "no (maybe)") and not re.fullmatch(choice, "nope")
    assert vllm_guided_fields({"structured_outputs": {"regex": "b+"}}) == {"regex": "b+"}
    assert vllm_guided_fields({"unrelated": 1}) == {}


@pytest.mark.parametrize("extra, param", [
    ({"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
    ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "guided_grammar"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_json": {}, "guided_regex": "a"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": "x"}, "structured_outputs"),
])
def test_vllm_guided_fields_refused(extra, param):
    with pytest.raises(RequestError) as e:
        vllm_guided_fields(extra)
    assert e.value.status == 400 and e.value.param == param


def test_one_constraint_per_request():
    rf = ResponseFormat(type="json_object")
    with pytest.raises(RequestError, match="mutually exclusive"):
        constrained_sampling_fields(rf, None, {"json_schema": "{}"})
    with pytest.raises(RequestError, match="mutually exclusive"):
        constrained_sampling_fields(None, "a", {"regex": "b"})
    assert constrained_sampling_fields(None, None, {"regex": "b"}) == {"regex": "b"}


def test_structural_tag_response_format_maps_to_the_sampling_field():
    schema = {"type": "object"}
    legacy = {"type": "structural_tag", "structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}],
              "triggers": ["<f"]}
    got = constrained_sampling_fields(ResponseFormat(**legacy), None)
    assert json.loads(got["structural_tag"]) == legacy  # the same JSON /generate takes
    fmt = {"type": "structural_tag", "format": {"type": "const_string", "value": "x"}}
    assert json.loads(constrained_sampling_fields(ResponseFormat(**fmt), None)["structural_tag"]) == fmt
    assert constrained_sampling_fields(None, None, None, fmt) == {"structural_tag": json.dumps(fmt)}
    for bad in ({"type": "structural_tag"}, {**legacy, "at_least_one": True},
                {"type": "structural_tag", "structures": []}):
        with pytest.raises(RequestError) as e:
            constrained_sampling_fields(ResponseFormat(**bad), None)
        assert e.value.status == 400 and e.value.param == "response_format"
    with pytest.raises(RequestError, match="mutually exclusive"):
        constrained_sampling_fields(ResponseFormat(**legacy), "a+")


def test_priority_reaches_the_request_model(tiny_llama):
    from transformers import AutoTokenizer

    from radixlm.runtime.server.openai_api import prepare_completion
    from radixlm.runtime.server.openai_protocol import CompletionRequest

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prep = prepare_completion(CompletionRequest(prompt="hi", max_tokens=2, priority=7), tok,
                              {"context_length": 256}, "m")
    assert prep.obj.priority == 7
    reqs = prep.obj.normalize(tok)
    assert all(r.priority == 7 for r in reqs)
