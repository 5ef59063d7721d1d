"""The wire protocol: every message between radixlm processes, as typed msgspec Structs.

Encoded as msgpack with a tagged union, decoded with validation: malformed bytes raise
``msgspec.ValidationError``/``DecodeError`` which the receiver answers with an ErrorOut, never
executes and never dies of. Nothing on any socket is pickled.

The in-process Engine uses the same Structs without encoding them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Union

import msgspec

from radixlm.runtime.sampling_params import SamplingParams


class _Msg(msgspec.Struct, tag=True, kw_only=True, omit_defaults=True):
    pass


# --------------------------------------------------------------------------- logprob options
class LogprobOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """SGLang's request-level logprob options: the one definition, used by the DSL (``gen``,
    ``run``), ``GenerateReqInput.normalize``, the wire (``TokenizedGenerateReq``) and ``Req``.

    ``logprob_start_len`` -1 (SGLang's ``None``) asks for output logprobs only; from ``k`` >= 0 the
    prompt's tokens ``k..`` are scored too. ``top_logprobs_num`` > 0 adds that many alternatives per
    position. ``token_ids_logprob`` adds, per position, the logprobs of exactly those token ids (in
    the order given; ``meta_info``'s ``input_token_ids_logprobs`` / ``output_token_ids_logprobs``).
    ``return_text_in_logprobs`` adds each token's text to the entries (front end only).
    """

    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: tuple[int, ...] | None = None
    return_text_in_logprobs: bool = False

    FIELDS: ClassVar[tuple[str, ...]] = (
        "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs")

    def __post_init__(self) -> None:
        if self.logprob_start_len < -1:
            raise ValueError(f"logprob_start_len must be >= -1, got {self.logprob_start_len}")
        if self.top_logprobs_num < 0:
            raise ValueError(f"top_logprobs_num must be >= 0, got {self.top_logprobs_num}")
        if self.token_ids_logprob is not None and any(t < 0 for t in self.token_ids_logprob):
            bad = min(self.token_ids_logprob)
            raise ValueError(f"token_ids_logprob: token id {bad} is out of the vocabulary (negative)")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LogprobOptions":
        """User input (kwargs or a body's fields; ``None`` values mean unset) → validated options.
        Raises ValueError naming the field."""
        values = {k: v for k, v in (d or {}).items() if v is not None}
        if values.get("token_ids_logprob") in ([], ()):
            del values["token_ids_logprob"]  # SGLang: an empty list asks for nothing
        unknown = sorted(k for k in values if k not in cls.FIELDS)
        if unknown:
            raise ValueError(f"unknown logprob option(s) {unknown}")
        try:
            return msgspec.convert(values, cls)
        except msgspec.ValidationError as e:
            raise ValueError(field_error_message(e)) from None

    def replace(self, **changes: Any) -> "LogprobOptions":
        """A copy with ``changes`` applied (``None`` values keep the current value), validated."""
        return LogprobOptions.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the defaults (what a ``/generate`` body needs to carry)."""
        return msgspec.to_builtins(self)

    def for_scheduler(self) -> "LogprobOptions":
        """What a ``Req`` keeps: without ``return_logprob`` the other options mean nothing."""
        return self if self.return_logprob else LogprobOptions(return_text_in_logprobs=self.return_text_in_logprobs)


def field_error_message(e: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.top_logprobs_num[0]`" → "top_logprobs_num: Expected
    `int`, got `str`", so the message names the field first, as every ValueError of the runtime does."""
    msg = str(e)
    head, sep, where = msg.partition(" - at ")
    m = re.search(r"\$\.([A-Za-z_][A-Za-z0-9_]*)", where) if sep else None
    if m:
        return f"{m.group(1)}: {head}"
    m = re.match(r"Object contains unknown field `([^`]+)`", msg)
    if m:
        return f"{m.group(1)}: unknown field"
    return msg


# --------------------------------------------------------------------------- requests to the scheduler
class TokenizedGenerateReq(_Msg):
    """One sequence to generate. ``n`` > 1 is expanded by the front end into n of these."""

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    logprob: LogprobOptions = LogprobOptions()
    stream: bool = False
    # The KV cache namespace (from cache_salt / extra_key, see generate_request.cache_namespace): the
    # request shares radix-tree nodes and disk blocks only with requests of the same namespace.
    cache_namespace: str = ""
    # SGLang's request priority (--enable-priority-scheduling); None: the server's default
    priority: int | None = None


class AbortReq(_Msg):
    rid: str


class FlushCacheReq(_Msg):
    pass


class GetStatsReq(_Msg):
    pass


# --------------------------------------------------------------------------- outputs from the scheduler
class TokenLogprob(msgspec.Struct, array_like=True):
    logprob: float | None
    token_id: int


class ReqOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one request produced in one scheduler step (new tokens since the last ReqOutput)."""

    rid: str
    new_token_ids: list[int]
    finished: bool = False
    # SGLang's finish_reason: {"type": "stop"|"length"|"abort", "matched": token id or stop string}
    finish_reason: dict | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Logprobs, sent once for the prompt (with the first output) and incrementally for outputs.
    input_token_logprobs: list[TokenLogprob] | None = None
    input_top_logprobs: list[list[TokenLogprob] | None] | None = None
    output_token_logprobs: list[TokenLogprob] | None = None
    output_top_logprobs: list[list[TokenLogprob]] | None = None
    # token_ids_logprob: per position, the requested ids' logprobs (None for the prompt's first token)
    input_token_ids_logprobs: list[list[TokenLogprob] | None] | None = None
    output_token_ids_logprobs: list[list[TokenLogprob]] | None = None
    # Set when the request failed in the scheduler: the message its client gets.
    error: str | None = None


class BatchOut(_Msg):
    outputs: list[ReqOutput]


class FlushCacheOut(_Msg):
    success: bool
    message: str = ""


class StatsOut(_Msg):
    stats: dict


class ProfileReq(_Msg):
    """Start or stop the torch profiler in the scheduler (SGLang's /start_profile, /stop_profile)."""

    action: str  # "start" | "stop"
    output_dir: str = ""  # where "stop" writes the Chrome trace (start's value is kept)


class ProfileOut(_Msg):
    success: bool
    message: str = ""


class ErrorOut(_Msg, kw_only=True):
    """Answer to a request or message that could not be handled; rid empty if unknown."""

    rid: str = ""
    message: str


class HeartbeatOut(_Msg):
    """Scheduler process → front end (through the detokenizer) about once a second, idle or busy: the
    loop is alive and has run ``step_count`` steps. /health fails when these stop (runtime/server)."""

    step_count: int
    num_running: int = 0
    num_waiting: int = 0


SchedulerInput = Union[TokenizedGenerateReq, AbortReq, FlushCacheReq, GetStatsReq, ProfileReq]
SchedulerOutput = Union[BatchOut, FlushCacheOut, StatsOut, ErrorOut, HeartbeatOut, ProfileOut]

_encoder = msgspec.msgpack.Encoder()
_in_decoder = msgspec.msgpack.Decoder(SchedulerInput)
_out_decoder = msgspec.msgpack.Decoder(SchedulerOutput)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode_scheduler_input(data: bytes) -> SchedulerInput:
    return _in_decoder.decode(data)


def decode_scheduler_output(data: bytes) -> SchedulerOutput:
    return _out_decoder.decode(data)


# =========================================================================== server plumbing (runtime/server)
# Added for the multi-process server; the in-process Engine never sees these. Scheduler → detokenizer →
# tokenizer manager is one ordered path, so control replies (stats, flush) keep their order.
from typing import Literal  # noqa: E402


class ReadyOut(_Msg):
    """Scheduler process → front end, once, after the model is loaded: the server may open its doors."""

    model_info: dict[str, Any]
    pid: int


class DetokRegister(_Msg):
    """Tokenizer manager → detokenizer, sent before the request goes to the scheduler: what the
    detokenizer needs to turn this rid's token ids into text (it owns the RequestState)."""

    req: TokenizedGenerateReq


class DetokOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One request's progress after one scheduler step, as text (built by RequestState)."""

    rid: str
    num_new_tokens: int = 0
    finished: bool = False
    # RequestState.result(streaming=True) for a streaming request after each step, result() once a
    # request finished; None for a non-streaming request still running (only num_new_tokens, for metrics).
    data: dict[str, Any] | None = None


class DetokBatchOut(_Msg):
    outputs: list[DetokOut]


DetokenizerInput = Union[BatchOut, FlushCacheOut, StatsOut, ErrorOut, ReadyOut, DetokRegister, HeartbeatOut,
                         ProfileOut]
TokenizerManagerInput = Union[DetokBatchOut, FlushCacheOut, StatsOut, ErrorOut, ReadyOut, HeartbeatOut, ProfileOut]

_detok_in_decoder = msgspec.msgpack.Decoder(DetokenizerInput)
_tm_in_decoder = msgspec.msgpack.Decoder(TokenizerManagerInput)


def decode_detokenizer_input(data: bytes) -> DetokenizerInput:
    return _detok_in_decoder.decode(data)


def decode_tokenizer_manager_input(data: bytes) -> TokenizerManagerInput:
    return _tm_in_decoder.decode(data)


# --------------------------------------------------------------------------- ZeroMQ front door (DSL clients)
# A client (DEALER) sends one of these; every reply names the client's req_id. ``body`` is SGLang's
# /generate body, validated by the same GenerateReqInput as HTTP. With --api-key every message
# carries the key.
class ClientGenerate(_Msg):
    req_id: str
    body: dict[str, Any]
    api_key: str | None = None


class ClientAbort(_Msg):
    req_id: str  # the req_id of the ClientGenerate to abort
    api_key: str | None = None


class ClientCommand(_Msg):
    req_id: str
    command: Literal["get_model_info", "get_server_info", "flush_cache", "health"]
    api_key: str | None = None


class ClientChunk(_Msg):
    """A streamed chunk (finished=False) or the final answer (finished=True) of a req_id."""

    req_id: str
    data: Any
    finished: bool = False


class ClientError(_Msg, kw_only=True):
    """The req_id failed (req_id empty when the message itself was unreadable); HTTP-like status."""

    req_id: str = ""
    message: str
    status: int = 400


FrontDoorRequest = Union[ClientGenerate, ClientAbort, ClientCommand]
FrontDoorReply = Union[ClientChunk, ClientError]

_front_req_decoder = msgspec.msgpack.Decoder(FrontDoorRequest)
_front_reply_decoder = msgspec.msgpack.Decoder(FrontDoorReply)


def decode_front_door_request(data: bytes) -> FrontDoorRequest:
    return _front_req_decoder.decode(data)


def decode_front_door_reply(data: bytes) -> FrontDoorReply:
    return _front_reply_decoder.decode(data)


# --------------------------------------------------------------------------- tensor-parallel steps
# Rank 0's ModelRunner sends each forward pass to the other ranks (runtime/distributed/step_channel.py).
# Tensors travel as raw little-endian int64 bytes (``tensor.numpy().tobytes()``): no pickle, no per-int cost.
class TPReady(_Msg):
    """A follower rank connected to the step channel."""

    rank: int


class TPStep(_Msg):
    """One forward pass: the ForwardBatch's tensors and the batch's rows of req_to_token."""

    mode: str  # ForwardMode value
    input_ids: bytes  # [T] int64
    positions: bytes  # [T] int64
    out_cache_loc: bytes  # [T] int64
    req_pool_indices: bytes  # [B] int64
    prefix_lens: list[int]  # [B]
    extend_lens: list[int]  # [B]
    logits_indices: bytes | None = None  # [N] int64, None: the last token of each request
    rows: bytes = b""  # [B, row_len] int64: req_to_token[req_pool_indices, :row_len]
    row_len: int = 0


class TPShutdown(_Msg):
    pass


TPMessage = Union[TPReady, TPStep, TPShutdown]
_tp_decoder = msgspec.msgpack.Decoder(TPMessage)


def decode_tp_message(data: bytes) -> TPMessage:
    return _tp_decoder.decode(data)
