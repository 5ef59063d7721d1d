"""The HTTP front door: a FastAPI app with SGLang's native routes and the OpenAI-compatible ones.

Native: /generate, /get_model_info, /get_server_info (= /server_info), /health, /health_generate,
/flush_cache, /abort_request, /metrics, /parse_function_call, /separate_reasoning. OpenAI: /v1/models, /v1/completions, /v1/chat/completions.

Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input
(malformed JSON, wrong types, invalid UTF-8, values out of range — the message names the field), 401
without the API key, 413 for a body over the limit, 503 once the scheduler is gone. A client that
disconnects aborts its requests (streaming: Starlette cancels the stream; non-streaming: a watcher on
the ASGI receive channel).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse

import radixlm
from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.server import openai_api, openai_tools
from radixlm.runtime.server.native_protocol import parse_generate_body
from radixlm.runtime.server.native_stream import native_streamers
from radixlm.runtime.server.sglang_routes import register_sglang_routes, sglang_model_info_keys, sglang_server_info_keys
from radixlm.runtime.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from radixlm.runtime.server.openai_protocol import ChatCompletionRequest, CompletionRequest
from radixlm.runtime.server.openai_tools import ChatConfig
from radixlm.runtime.server.tokenizer_manager import GenEvent, RequestError, RequestHandle, TokenizerManager
from radixlm.runtime.prompt_format import prompt_format_info
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger("radixlm.http")


@dataclass
class ServerContext:
    """Everything the routes need, built once by the launcher."""

    args: ServerArgs
    tm: TokenizerManager
    metrics: ServerMetrics
    frontdoor_address: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    chat_template: str | None = None
    _prompt_format: dict | None = None
    chat: ChatConfig = field(default_factory=lambda: ChatConfig(None, None, None))
    started: float = field(default_factory=time.time)

    @property
    def model_name(self) -> str:
        return self.args.model_id

    @property
    def max_body_bytes(self) -> int:
        return self.args.max_request_body_bytes

    def model_info(self) -> dict:
        a = self.args
        if self._prompt_format is None:  # derived once: it renders the chat template a few times
            eos = list(self.tm.model_info.get("eos_token_ids", []))
            self._prompt_format = prompt_format_info(self.tm.tokenizer, self.chat_template, eos)
        return sglang_model_info_keys({
            "model_path": a.model_path, "tokenizer_path": a.tokenizer_path or a.model_path,
            "is_generation": True, "served_model_name": self.model_name, **self.tm.model_info,
            **self._prompt_format})

    async def server_info(self) -> dict:
        """Server args (minus the key), addresses, pids, model info and the scheduler's live stats."""
        tm = self.tm
        info: dict[str, Any] = {k: v for k, v in dataclasses.asdict(self.args).items() if k != "api_key"}
        pids = dict(self.pids)
        if tm.scheduler_pid:
            pids["scheduler"] = tm.scheduler_pid
        info.update(
            version=radixlm.__version__,
            zmq_frontdoor=self.frontdoor_address,
            pids=pids,
            model_info=tm.model_info,
            num_active_requests=tm.num_active,
            uptime_s=time.time() - self.started,
            ipc_dir=tm.ipc.dir,
        )
        info["scheduler_stats"] = await tm.get_stats()
        return sglang_server_info_keys(info)


# --------------------------------------------------------------------------- errors
def error_response(status: int, message: str, param: str | None = None, err_type: str | None = None,
                   code: str | int | None = None) -> JSONResponse:
    if err_type is None:
        err_type = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                    413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status if code is None else code}}
    return JSONResponse(body, status_code=status)


def _validation_error(e: pydantic.ValidationError) -> JSONResponse:
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
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


class _GuardMiddleware:
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


# --------------------------------------------------------------------------- client disconnects
async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (uvicorn blocks until then).
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _until_disconnect(request: Request, coro: Any) -> tuple[bool, Any]:
    """Run ``coro``; (True, None) if the client went away first (the caller then aborts)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return False, task.result()
        task.cancel()
        return True, None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _collect(handle: RequestHandle) -> list[dict]:
    results: list[Any] = [None] * len(handle.reqs)
    async for ev in handle:
        if ev.finished:
            results[ev.index] = ev.data
    return results


async def _first_event(handle: RequestHandle) -> GenEvent | None:
    try:
        return await handle.__anext__()
    except StopAsyncIteration:
        return None


async def _start_stream(request: Request, handle: RequestHandle) -> tuple[bool, GenEvent | None]:
    """Wait for the first event before sending headers, so an error the scheduler finds (e.g. the prompt
    can never fit) is still a proper 4xx; abort on disconnect or error."""
    try:
        gone, first = await _until_disconnect(request, _first_event(handle))
    except BaseException:
        handle.close()
        raise
    if gone:
        handle.close()
    return gone, first


async def _chain(first: GenEvent | None, handle: RequestHandle) -> AsyncIterator[GenEvent]:
    if first is not None:
        yield first
    async for ev in handle:
        yield ev


async def _sse_guard(gen: AsyncIterator[str], handle: RequestHandle) -> AsyncIterator[str]:
    """Errors after the headers went out become an SSE error event; closing always aborts the rest."""
    try:
        async for s in gen:
            yield s
    except RequestError as e:
        body = {"error": {"message": str(e), "type": "invalid_request_error" if e.status < 500 else "server_error",
                          "param": e.param, "code": e.status}}
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        handle.close()


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --------------------------------------------------------------------------- app
def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="radixlm", version=radixlm.__version__, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    tm = ctx.tm
    app.add_middleware(_GuardMiddleware, api_key=ctx.args.api_key, max_body_bytes=ctx.max_body_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        code = getattr(e, "code", None)  # e.g. model_not_found, as OpenAI names it
        return error_response(e.status, str(e), param=e.param, code=code,
                              err_type="invalid_request_error" if code else None)

    @app.exception_handler(pydantic.ValidationError)
    async def _pydantic_error(_: Request, e: pydantic.ValidationError) -> JSONResponse:
        return _validation_error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def _bad_method(request: Request, _: Exception) -> JSONResponse:
        return error_response(405, f"method {request.method} not allowed on {request.url.path}")

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(500, f"internal server error: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ health and info
    @app.get("/health")
    async def health() -> Response:
        if not tm.is_alive:
            return error_response(503, f"unhealthy: {tm.dead_reason or 'starting'}")
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if not tm.is_alive:
            return error_response(503, f"unhealthy: {tm.dead_reason or 'starting'}")
        obj = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        handle = tm.submit(obj)
        try:
            await asyncio.wait_for(_collect(handle), timeout=30.0)
        except (RequestError, asyncio.TimeoutError) as e:
            return error_response(503, f"unhealthy: generation failed: {e}")
        finally:
            handle.close()
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info() -> dict:
        return ctx.model_info()

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> dict:
        return await ctx.server_info()

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> JSONResponse:
        out = await tm.flush_cache()
        return JSONResponse({"success": out.success, "message": out.message}, status_code=200 if out.success else 400)

    register_sglang_routes(app, ctx, json_body)  # /abort_request, /tokenize, /encode, ...

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            await tm.get_stats(timeout=2.0)
        except (RequestError, asyncio.TimeoutError):
            pass  # latency histograms are still worth serving
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ native generate
    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await json_body(request)
        obj = parse_generate_body(body)
        handle = tm.submit(obj)
        single = len(handle.reqs) == 1 and not obj.is_batch
        if not obj.stream:
            try:
                gone, results = await _until_disconnect(request, _collect(handle))
            finally:
                handle.close()
            if gone:
                return Response(status_code=499)
            return JSONResponse(results[0] if single else results)
        gone, first = await _start_stream(request, handle)
        if gone:
            return Response(status_code=499)
        streamers = native_streamers(ctx.args, handle.reqs)
        return StreamingResponse(
            _sse_guard(_native_stream(_chain(first, handle), streamers, single), handle),
            media_type="text/event-stream", headers=_SSE_HEADERS,
        )

    # ------------------------------------------------------------------ SGLang's parser endpoints
    @app.post("/parse_function_call")
    async def parse_function_call(request: Request) -> dict:
        return openai_tools.parse_function_call_endpoint(await json_body(request), ctx.chat)

    @app.post("/separate_reasoning")
    async def separate_reasoning(request: Request) -> dict:
        return openai_tools.separate_reasoning_endpoint(await json_body(request), ctx.chat)

    # ------------------------------------------------------------------ OpenAI
    model_names = openai_api.served_model_names(ctx.model_name, ctx.args.model_path)

    def model_card() -> dict:
        return {"id": ctx.model_name, "object": "model", "created": int(ctx.started), "owned_by": "radixlm",
                "root": ctx.args.model_path, "max_model_len": tm.model_info.get("context_length")}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        openai_api.check_model(model_id, model_names)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = CompletionRequest.model_validate(await json_body(request))
        openai_api.check_model(req.model, model_names)
        prep = openai_api.prepare_completion(req, tm.tokenizer, tm.model_info, ctx.model_name)
        return await _openai(request, prep, req,
                             lambda results: openai_api.completion_response(prep, req, results, tm.tokenizer),
                             lambda events: openai_api.stream_completion(prep, req, events, tm.tokenizer))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = ChatCompletionRequest.model_validate(await json_body(request))
        openai_api.check_model(req.model, model_names)
        prep = openai_api.prepare_chat(req, tm.tokenizer, ctx.chat, tm.model_info, ctx.model_name)
        return await _openai(request, prep, req,
                             lambda results: openai_api.chat_response(prep, req, results),
                             lambda events: openai_api.stream_chat(prep, req, events))

    async def _openai(request: Request, prep: Any, req: Any, build: Any, stream: Any) -> Response:
        handle = tm.submit(prep.obj)
        if not req.stream:
            try:
                gone, results = await _until_disconnect(request, _collect(handle))
            finally:
                handle.close()
            return Response(status_code=499) if gone else JSONResponse(build(results))
        gone, first = await _start_stream(request, handle)
        if gone:
            return Response(status_code=499)
        return StreamingResponse(_sse_guard(stream(_chain(first, handle)), handle),
                                 media_type="text/event-stream", headers=_SSE_HEADERS)

    return app


async def _native_stream(events: AsyncIterator[GenEvent], streamers: list, single: bool) -> AsyncIterator[str]:
    """SGLang's /generate stream (see runtime/server/native_stream.py), then [DONE]."""
    async for ev in events:
        chunk = streamers[ev.index].add(ev.data)
        if chunk is None:
            continue
        if not single:
            chunk["index"] = ev.index
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"
