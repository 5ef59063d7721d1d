"""SGLang and vLLM extras on the OpenAI routes that change the output: implemented or refused.

The OpenAI request models ignore unknown fields (a newer official client keeps working), so an extra
that would change the output must be handled here by name, never dropped:

* implemented: ``stop_regex``, ``ebnf`` (SGLang), ``sampling_seed`` (SGLang's ``seed``), vLLM's
  ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and ``structured_outputs``
  (``json``, ``regex``, ``choice``, ``grammar``), ``include_stop_str_in_output`` (= ``no_stop_trim``);
* refused with a 400 naming the field when non-empty: ``REFUSED`` below.

``grammar_fields`` turns the implemented ones into SamplingParams fields; at most one grammar per
request (SamplingParams rejects two).
"""

from __future__ import annotations

import json
import re
from typing import Any

# field → why radixlm cannot honour it
REFUSED: dict[str, str] = {
    "use_beam_search": "beam search is not implemented",
    "length_penalty": "beam search is not implemented",
    "prompt_logprobs": "use /v1/completions with echo and logprobs for prompt logprobs",
    "bad_words": "bad_words is not implemented; use logit_bias",
    "allowed_token_ids": "allowed_token_ids is not implemented; use logit_bias or a regex",
    "truncate_prompt_tokens": "prompt truncation is not implemented",
    "guided_whitespace_pattern": "set the server's --constrained-json-whitespace-pattern instead",
    "structural_tag": "structural tags need a context-free grammar backend, which this server lacks",
    "custom_logit_processor": "custom logit processors are not supported",
    "lora_path": "LoRA adapters are not supported",
    "return_hidden_states": "returning hidden states is not supported",
}


def _empty(value: Any) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {}


def check_refused(body: Any) -> None:
    """ValueError naming the first refused extra with a non-empty value (body: the raw JSON object)."""
    if not isinstance(body, dict):
        return
    for name, why in REFUSED.items():
        if name in body and not _empty(body[name]):
            raise ValueError(f"{name}: not supported ({why})")


def _choice_regex(choices: Any, field: str) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{field}: a non-empty list of non-empty strings is required")
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def _schema(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    raise ValueError(f"{field}: a JSON schema (object or string) is required")


def grammar_fields(extras: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams fields from the implemented extras (``extras``: field → value, None if absent)."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any, field: str) -> None:
        if key in out:
            raise ValueError(f"{field}: only one grammar per request (also given: {out[key][1]})")
        out[key] = (value, field)

    if extras.get("ebnf") is not None:
        put("ebnf", extras["ebnf"], "ebnf")
    if extras.get("guided_json") is not None:
        put("json_schema", _schema(extras["guided_json"], "guided_json"), "guided_json")
    if extras.get("guided_regex") is not None:
        put("regex", extras["guided_regex"], "guided_regex")
    if extras.get("guided_choice") is not None:
        put("regex", _choice_regex(extras["guided_choice"], "guided_choice"), "guided_choice")
    if extras.get("guided_grammar") is not None:
        put("ebnf", extras["guided_grammar"], "guided_grammar")
    so = extras.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise ValueError("structured_outputs: an object is required")
        known = {"json", "regex", "choice", "grammar", "whitespace_pattern", "disable_any_whitespace",
                 "disable_fallback", "disable_additional_properties"}
        unknown = sorted(set(so) - known)
        if unknown:
            raise ValueError(f"structured_outputs: unknown field(s) {unknown}")
        for k in ("whitespace_pattern", "disable_any_whitespace", "disable_additional_properties"):
            if not _empty(so.get(k)):
                raise ValueError(f"structured_outputs.{k}: not supported")
        if so.get("json") is not None:
            put("json_schema", _schema(so["json"], "structured_outputs.json"), "structured_outputs.json")
        if so.get("regex") is not None:
            put("regex", so["regex"], "structured_outputs.regex")
        if so.get("choice") is not None:
            put("regex", _choice_regex(so["choice"], "structured_outputs.choice"), "structured_outputs.choice")
        if so.get("grammar") is not None:
            put("ebnf", so["grammar"], "structured_outputs.grammar")
    fields = {k: v for k, (v, _) in out.items()}
    if extras.get("stop_regex") is not None:
        fields["stop_regex"] = extras["stop_regex"]
    if extras.get("sampling_seed") is not None:
        fields["sampling_seed"] = extras["sampling_seed"]
    if extras.get("include_stop_str_in_output"):
        fields["no_stop_trim"] = True
    return fields


EXTRA_FIELDS = ("ebnf", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
                "stop_regex", "sampling_seed", "include_stop_str_in_output")
