"""SamplingParams: the one definition of how a request samples.

Shared by the DSL (``radixlm.gen`` overrides fields), the Engine, the HTTP API and the wire protocol
(it is a msgspec Struct, so it travels between processes as msgpack unchanged). Validation lives
here and nowhere else: every front door calls ``SamplingParams.from_dict`` or ``verify`` and turns
the ``ValueError`` (which always names the field) into its own error shape.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import msgspec

MAX_STOP_REGEX_COUNT = 16
MAX_STOP_REGEX_BYTES = 4096
UNBOUNDED = 1 << 30  # the width of a pattern with an unbounded repeat

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
    # SGLang 0.5's fields. stop_regex: stop once the output text matches one of these (re.search).
    stop_regex: list[str] | None = None
    ebnf: str | None = None  # a GBNF-style EBNF grammar (root rule ``root``), for a CFG grammar backend
    structural_tag: str | None = None  # SGLang/xgrammar structural tag, as a JSON string
    stream_interval: int | None = None  # streaming: send a chunk every N tokens (None: the server's)
    # Free-form values for a custom logit processor. radixlm has none (a request naming one is
    # rejected), so nothing reads these: accepted only because SGLang clients send them.
    custom_params: dict[str, Any] | None = None

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
        known = set(cls.__struct_fields__) | {"sampling_seed"}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"sampling_params: unknown field(s) {sorted(unknown)}")
        values = {k: v for k, v in d.items() if v is not None}
        if "sampling_seed" in values:  # SGLang's name for seed; one field here
            alias = values.pop("sampling_seed")
            if "seed" in values and values["seed"] != alias:
                raise ValueError("sampling_seed and seed are the same field; give one (they differ here)")
            values["seed"] = alias
        for name in ("stop", "stop_regex"):
            if isinstance(values.get(name), str):
                values[name] = [values[name]]
        if "structural_tag" in values and not isinstance(values["structural_tag"], str):
            values["structural_tag"] = json.dumps(values["structural_tag"])
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
        if isinstance(self.stop_regex, str):
            self.stop_regex = [self.stop_regex]
        if self.stop_regex is not None:
            self.stop_regex = [s for s in self.stop_regex if s] or None
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
        grammars = [k for k in ("regex", "json_schema", "ebnf", "structural_tag") if getattr(self, k) is not None]
        if len(grammars) > 1:
            raise ValueError(f"{' and '.join(grammars)} are mutually exclusive (one grammar per request)")
        if self.stop_regex is not None:
            if len(self.stop_regex) > MAX_STOP_REGEX_COUNT:
                raise ValueError(f"stop_regex: at most {MAX_STOP_REGEX_COUNT} patterns, got {len(self.stop_regex)}")
            for pat in self.stop_regex:
                if len(pat.encode()) > MAX_STOP_REGEX_BYTES:
                    raise ValueError(f"stop_regex: a pattern is over the {MAX_STOP_REGEX_BYTES}-byte limit")
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"stop_regex: {pat!r} is not a valid regex: {e}") from None
        if self.stream_interval is not None and self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.structural_tag is not None:
            try:
                json.loads(self.structural_tag)
            except json.JSONDecodeError as e:
                raise ValueError(f"structural_tag is not valid JSON: {e}") from None
        if self.json_schema is not None:
            try:
                json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None

    # ------------------------------------------------------------------ helpers
    @property
    def stop_regex_window(self) -> int:
        """Output tokens a stop_regex match can span (each token is at least one character), as SGLang
        bounds it; 0 without stop_regex, ``UNBOUNDED`` for a pattern with no finite width."""
        if not self.stop_regex:
            return 0
        return max(_regex_max_width(p) for p in self.stop_regex)

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


@lru_cache(maxsize=1024)
def _regex_max_width(pattern: str) -> int:
    """Longest string (characters) ``pattern`` can match; ``UNBOUNDED`` if there is no bound."""
    try:
        import re._parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore[no-redef]
    hi = sre_parse.parse(pattern).getwidth()[1]
    return min(int(hi), UNBOUNDED)
