"""SamplingParams: the one definition of how a request samples.

Shared by the DSL (``radixlm.gen`` overrides fields), the Engine, the HTTP API and the wire protocol
(it is a msgspec Struct, so it travels between processes as msgpack unchanged). Validation lives
here and nowhere else: every front door calls ``SamplingParams.from_dict`` or ``verify`` and turns
the ``ValueError`` (which always names the field) into its own error shape.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

# A top_k of -1 (or 0, as OpenAI-ish clients send) means "no top-k".
_NO_TOP_K = -1


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = _NO_TOP_K
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    regex: str | None = None
    json_schema: str | None = None
    logit_bias: dict[int, float] | None = None  # token id → added to its logit before sampling (OpenAI's)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict[str, Any] | "SamplingParams" | None) -> "SamplingParams":
        """Build from user input (a dict from JSON, kwargs, or an instance), normalise, verify.

        Unknown keys are rejected by name, so a typo never silently samples differently.
        """
        if d is None:
            d = {}
        if isinstance(d, SamplingParams):
            sp = msgspec.structs.replace(d)
            sp.normalize()
            sp.verify()
            return sp
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be a dict, got {type(d).__name__}")
        known = set(cls.__struct_fields__)
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"sampling_params: unknown field(s) {sorted(unknown)}")
        values = {k: v for k, v in d.items() if v is not None}
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        if "json_schema" in values and not isinstance(values["json_schema"], str):
            values["json_schema"] = schema_to_json(values["json_schema"])
        try:
            sp = msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"sampling_params: {e}") from None
        sp.normalize()
        sp.verify()
        return sp

    def normalize(self) -> None:
        """Canonical forms: stop as a list, json_schema as a JSON string, top_k 0 → -1."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            self.stop = [s for s in self.stop if s] or None
        if self.top_k == 0:
            self.top_k = _NO_TOP_K
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            self.json_schema = schema_to_json(self.json_schema)
        if not self.logit_bias:
            self.logit_bias = None

    def verify(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the offending field (``vocab_size``: also check token ids against it)."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1 and self.top_k != _NO_TOP_K:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not (0.0 < self.repetition_penalty <= 2.0):
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.stop_token_ids is not None and any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        if vocab_size is not None and self.logit_bias and max(self.logit_bias) >= vocab_size:
            raise ValueError(f"logit_bias: token id {max(self.logit_bias)} is out of the vocabulary [0, {vocab_size})")
        if self.logit_bias is not None:
            for tok, bias in self.logit_bias.items():
                if not isinstance(tok, int) or tok < 0:
                    raise ValueError(f"logit_bias: keys must be non-negative token ids, got {tok!r}")
                if not (-100.0 <= bias <= 100.0):
                    raise ValueError(f"logit_bias: the bias of token {tok} must be in [-100, 100], got {bias}")
        if self.regex is not None and self.json_schema is not None:
            raise ValueError("regex and json_schema are mutually exclusive")
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None

    # ------------------------------------------------------------------ helpers
    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)

    def replace(self, **changes: Any) -> "SamplingParams":
        return msgspec.structs.replace(self, **changes)


def schema_to_json(schema: Any) -> str:
    """A JSON schema given as dict, JSON string or pydantic model class → canonical JSON string."""
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    model_json_schema = getattr(schema, "model_json_schema", None)
    if callable(model_json_schema):  # a pydantic v2 model class
        return json.dumps(model_json_schema())
    raise ValueError(f"json_schema must be a dict, a JSON string or a pydantic model, got {type(schema).__name__}")
