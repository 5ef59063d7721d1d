"""How a request that cannot be served reaches its client: ``RequestError`` (with the HTTP status it
maps to and the field it names, OpenAI's ``param``) and ``ServerDeadError`` (503).

Raised by the tokenizer manager and the OpenAI layer; the HTTP app turns them into OpenAI-shaped
error bodies, the ZeroMQ front door into ``ClientError`` replies.
"""

from __future__ import annotations

import re

from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.sampling_params import SamplingParams

class RequestError(Exception):
    """A request failed; ``status`` is the HTTP status it maps to."""

    status = 400

    def __init__(self, message: str, status: int | None = None, param: str | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.param = param if param is not None else param_named_in(message)


def param_named_in(message: str) -> str | None:
    """The field a ValueError names first ("regex: ...", "top_p must be ..."), for OpenAI's ``param``."""
    m = re.match(r"([a-z_]+)\b", message)
    if m is None:
        return None
    word = m.group(1)
    known = set(SamplingParams.__struct_fields__) | set(GenerateReqInput.__struct_fields__)
    return word if word in known else None


class ServerDeadError(RequestError):
    status = 503
