"""SGLang and vLLM extras on the OpenAI routes that change the output: implemented or refused.

An extra that would change the output is handled by name, never dropped (vLLM's guided fields are
``openai_fields.vllm_guided_fields``'s):

* implemented: SGLang's ``stop_regex``, ``ebnf`` and ``sampling_seed`` (its name for ``seed``), and vLLM's
  ``include_stop_str_in_output`` (= ``no_stop_trim``);
* refused with a 400 naming the field when non-empty: ``REFUSED`` below.
"""

from __future__ import annotations

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
    "stream_interval": "chunking applies to /generate streams; OpenAI streams send every token",
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


def sglang_fields(extras: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams fields from SGLang's extras (``extras``: field → value, None if absent)."""
    fields: dict[str, Any] = {}
    for name in ("ebnf", "stop_regex", "sampling_seed"):
        if extras.get(name) is not None:
            fields[name] = extras[name]
    if extras.get("include_stop_str_in_output"):
        fields["no_stop_trim"] = True
    return fields


EXTRA_FIELDS = ("ebnf", "stop_regex", "sampling_seed", "include_stop_str_in_output")
