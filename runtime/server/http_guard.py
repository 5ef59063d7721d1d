"""The HTTP app's edges: the API-key check and body limit (a pure-ASGI middleware, so streaming is
unaffected), reading a JSON body with precise 400s, and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` that every failure is answered with.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

import pydantic
from fastapi import Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse

from radixlm.runtime.server.request_errors import RequestError
from radixlm.runtime.validation import check_json_strings


def error_response(status: int, message: str, param: str | None = None, err_type: str | None = None,
                   code: str | int | None = None) -> JSONResponse:
    if err_type is None:
        err_type = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    413: "invalid_request_error", 503: "service_unavailable", 504: "timeout"}.get(status, "server_error")
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status if code is None else code}}
    return JSONResponse(body, status_code=status)


def validation_error_response(e: pydantic.ValidationError) -> JSONResponse:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    param = ".".join(loc) or None
    return error_response(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param=param)


async def json_body(request: Request) -> Any:
    """The request's JSON (a dict) with precise 400s; the size limit is the middleware's."""
    raw = await request.body()
    if not raw.strip():
        raise RequestError("the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"malformed JSON body: {e}") from None
    except RecursionError:
        raise RequestError("the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        check_json_strings(body)  # "\ud800" escapes decode to strings no tokenizer or encoder accepts
    except ValueError as e:
        raise RequestError(str(e)) from None
    return body


class GuardMiddleware:
    """Pure-ASGI (streaming-safe) API-key check and request body limit."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") != "/health":
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await error_response(401, "invalid or missing API key (Authorization: Bearer ...)")(scope, receive, send)
                return
        limit = self.max_body_bytes
        try:
            declared = int(headers.get("content-length", "0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            await error_response(413, f"the request body is over the limit of {limit} bytes")(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"the request body is over the limit of {limit} bytes")
            return msg

        await self.app(scope, limited_receive, send)
