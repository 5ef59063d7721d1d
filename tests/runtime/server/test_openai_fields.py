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
