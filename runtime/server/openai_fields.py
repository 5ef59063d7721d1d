"""OpenAI request fields → SamplingParams fields, and the policy for the rest: an OpenAI feature this server
lacks is a 400 naming it, a field nobody defines is logged (as vLLM does), nothing is silently ignored.
``response_format``, SGLang's ``regex`` and vLLM's guided fields all become ``regex`` / ``json_schema``.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from radixlm.runtime.constrained import JSON_OBJECT_SCHEMA
from radixlm.runtime.server.openai_protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat
from radixlm.runtime.server.request_errors import RequestError

logger = logging.getLogger("radixlm.openai")


class NotSupportedError(RequestError):
    """A recognised OpenAI feature this server does not implement (yet): 400."""


# OpenAI request fields that change the output and that this server does not implement: 400, never ignored.
NOT_SUPPORTED = ("audio", "modalities", "prediction", "web_search_options", "reasoning_effort", "verbosity")


# vLLM's guided-decoding request fields (older guided_*, newer structured_outputs), read from the extras.
VLLM_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def vllm_guided_fields(extra: dict[str, Any]) -> dict[str, str]:
    """vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` (and ``structured_outputs`` with the
    same keys) as SamplingParams fields; a grammar is refused rather than ignored."""
    spec: dict[str, Any] = {}
    so = extra.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise RequestError("structured_outputs: an object is required", param="structured_outputs")
        spec.update({f"guided_{k}": v for k, v in so.items() if v is not None})
    spec.update({k: v for k, v in extra.items() if k.startswith("guided_") and v is not None})
    for key in ("guided_grammar", "guided_structural_tag"):
        if key in spec:
            raise NotSupportedError(f"{key}: not supported here (use regex, guided_json or response_format)",
                                    param=key)
    fields: dict[str, str] = {}
    if "guided_json" in spec:
        g = spec["guided_json"]
        fields["json_schema"] = g if isinstance(g, str) else json.dumps(g)
    if "guided_regex" in spec:
        fields["regex"] = str(spec["guided_regex"])
    if "guided_choice" in spec:
        choices = spec["guided_choice"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise RequestError("guided_choice: a non-empty list of strings is required", param="guided_choice")
        fields["regex"] = "(" + "|".join(re.escape(c) for c in choices) + ")"
    unknown = sorted(k for k in spec if k not in ("guided_json", "guided_regex", "guided_choice",
                                                  "guided_decoding_backend"))
    if unknown:
        raise NotSupportedError(f"{unknown[0]}: not supported here", param=unknown[0])
    if len(fields) > 1 or ("guided_regex" in spec and "guided_choice" in spec):
        raise RequestError("guided_json, guided_regex and guided_choice are mutually exclusive", param="guided_json")
    return fields


def _structural_tag(response_format: ResponseFormat) -> str:
    """SGLang's ``response_format: {"type": "structural_tag", ...}`` as the ``structural_tag`` sampling field
    (the same JSON /generate takes: its legacy structures/triggers form or xgrammar's ``format`` form)."""
    tag = {"type": "structural_tag", **(response_format.model_extra or {})}
    if "structures" not in tag and "format" not in tag:
        raise RequestError("response_format: a structural_tag needs structures and triggers (or format)",
                           param="response_format")
    if "structures" in tag:
        if tag.pop("at_least_one", False):
            raise NotSupportedError("response_format.at_least_one: not supported (a structural tag's triggers "
                                    "are optional here)", param="response_format")
        if "triggers" not in tag:
            raise RequestError("response_format: a structural_tag needs triggers", param="response_format")
    return json.dumps(tag)


def constrained_sampling_fields(response_format: ResponseFormat | None, regex: str | None,
                                guided: dict[str, str] | None = None,
                                structural_tag: str | dict | None = None) -> dict[str, str]:
    """THE place where OpenAI's ``response_format``, the extra ``regex`` / ``structural_tag`` fields and
    vLLM's guided fields become SamplingParams fields (``regex`` / ``json_schema`` / ``structural_tag``); the
    patterns themselves are validated by the shared front end. At most one of them may constrain a request."""
    sources: list[dict[str, str]] = [guided] if guided else []
    if regex is not None:
        sources.append({"regex": regex})
    if structural_tag is not None:
        sources.append({"structural_tag": structural_tag if isinstance(structural_tag, str)
                        else json.dumps(structural_tag)})
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            sources.append({"json_schema": JSON_OBJECT_SCHEMA})
        elif response_format.type == "json_schema":
            spec = response_format.json_schema or {}
            schema = spec.get("schema", spec.get("schema_"))
            if schema is None:
                raise RequestError("response_format.json_schema.schema is required", param="response_format")
            sources.append({"json_schema": json.dumps(schema)})
        elif response_format.type == "regex":
            if not response_format.regex:
                raise RequestError("response_format.regex is required", param="response_format")
            sources.append({"regex": response_format.regex})
        elif response_format.type == "structural_tag":
            sources.append({"structural_tag": _structural_tag(response_format)})
    if len(sources) > 1:
        raise RequestError("regex, structural_tag, vLLM's guided fields and response_format are mutually exclusive",
                           param="regex")
    return sources[0] if sources else {}


def logit_bias_ids(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings); the range check against the vocabulary is
    SamplingParams.verify's, at submit."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            out[int(k)] = float(v)
        except ValueError:
            raise RequestError(f"logit_bias: keys must be token ids, got {k!r}", param="logit_bias") from None
    return out


def check_fields(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Nothing is silently ignored: an OpenAI feature this server does not implement is a 400 naming it;
    a field nobody defines is logged and ignored, as vLLM does (so newer clients keep working)."""
    extra = dict(req.model_extra or {})
    if extra.get("modalities") in (["text"], ("text",)):
        extra.pop("modalities")  # text out is what this server does
    for name in NOT_SUPPORTED:
        if extra.pop(name, None) is not None:
            raise NotSupportedError(f"{name} is not supported by this server", param=name)
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options: only allowed when stream is true", param="stream_options")
    if getattr(req, "store", None):
        raise NotSupportedError("store: stored completions are not supported", param="store")
    unknown = sorted(k for k in extra if k not in VLLM_GUIDED and not k.startswith("guided_"))
    if unknown:
        logger.warning("ignored request fields (not OpenAI, vLLM or SGLang fields): %s", unknown)
