"""SGLang's native ``/generate`` protocol at the front doors (the HTTP route and the ZeroMQ front door
share it): the body becomes the one request model (``parse_generate_body``), and a streaming
request's per-step deltas become SGLang's stream chunks in ``native_stream.NativeStreamer``.
"""

from __future__ import annotations

import re
from typing import Any

from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.sglang_compat import split_sglang_extras
from radixlm.runtime.server.request_errors import RequestError


def parse_generate_body(body: Any) -> GenerateReqInput:
    """A ``/generate`` body (JSON from HTTP or a ZeroMQ client) → GenerateReqInput; RequestError (400,
    naming the field) for a wrong shape, type or field name."""
    if isinstance(body, dict):
        try:
            body = split_sglang_extras(body)  # SGLang-only fields: null ones dropped, others a 400
        except ValueError as e:
            raise RequestError(str(e), param=str(e).split(":", 1)[0]) from None
    try:
        return GenerateReqInput.from_dict(body)
    except ValueError as e:
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*): ", str(e))  # from_dict names the field first
        raise RequestError(str(e), param=m.group(1) if m else None) from None
