"""SGLang's /generate body, type-checked before it reaches ``GenerateReqInput``.

``GenerateReqInput`` (runtime/generate_request.py) validates values; this model checks *types* first so that a
client sending ``{"text": 5}`` or ``{"return_logprob": "yes"}`` gets a 400 naming the field instead of
a Python error. Shared by the HTTP route and the ZeroMQ front door.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.sglang_compat import split_sglang_extras
from radixlm.runtime.server.tokenizer_manager import RequestError


class NativeGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Optional[Union[StrictStr, list[StrictStr]]] = None
    input_ids: Optional[Union[list[StrictInt], list[list[StrictInt]]]] = None
    sampling_params: Optional[Union[dict[str, Any], list[dict[str, Any]]]] = None
    rid: Optional[Union[StrictStr, list[StrictStr]]] = None
    return_logprob: Union[StrictBool, list[StrictBool]] = False
    logprob_start_len: Optional[Union[StrictInt, list[StrictInt]]] = None
    top_logprobs_num: Optional[Union[StrictInt, list[StrictInt]]] = None
    return_text_in_logprobs: StrictBool = False
    stream: StrictBool = False
    cache_salt: Optional[Union[StrictStr, list[StrictStr]]] = None
    extra_key: Optional[Union[StrictStr, list[StrictStr]]] = None


def parse_generate_body(body: Any) -> GenerateReqInput:
    """JSON object → GenerateReqInput; RequestError (400, naming the field) on a wrong shape."""
    if not isinstance(body, dict):
        raise RequestError(f"the generate body must be an object, got {type(body).__name__}")
    try:
        body = split_sglang_extras(body)  # SGLang-only fields: null ones dropped, others a 400
    except ValueError as e:
        raise RequestError(str(e), param=str(e).split(":", 1)[0]) from None
    try:
        NativeGenerateRequest.model_validate(body)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err.get("loc") else None
        raise RequestError(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
    try:
        return GenerateReqInput.from_dict(body)
    except (TypeError, ValueError) as e:
        raise RequestError(str(e)) from None
