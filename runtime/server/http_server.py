"""The HTTP front door: a FastAPI app with SGLang's native routes and the OpenAI-compatible ones.

Native: /generate, /get_model_info, /get_server_info (= /server_info), /health, /health_generate,
/flush_cache, /abort_request, /metrics, /parse_function_call, /separate_reasoning. OpenAI: /v1/models,
/v1/models/{id}, /v1/completions, /v1/chat/completions; vLLM's /tokenize and /detokenize.

Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input
(malformed JSON, wrong types, invalid UTF-8, values out of range — the message names the field), 401
without the API key, 413 for a body over the limit, 503 once the scheduler is gone. A client that
disconnects aborts its requests (streaming: Starlette cancels the stream; non-streaming: a watcher on
the ASGI receive channel).

This module holds the routes; the middleware, body parsing and error bodies are in ``http_guard``, and
turning a request's events into a response (disconnects, SSE) in ``http_streaming``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse

import radixlm
from radixlm.runtime.generate_request import GenerateReqInput
from radixlm.runtime.server import openai_api, openai_tools, openapi_doc
from radixlm.runtime.server.http_guard import GuardMiddleware, error_response, json_body, validation_error_response
from radixlm.runtime.server.http_streaming import (
    SSE_HEADERS,
    chain,
    collect,
    native_stream,
    sse_guard,
    start_stream,
    until_disconnect,
)
from radixlm.runtime.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from radixlm.runtime.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
)
from radixlm.runtime.server.openai_tools import ChatConfig
from radixlm.runtime.server.native_api import parse_generate_body
from radixlm.runtime.server.native_stream import native_streamers
from radixlm.runtime.server.sglang_routes import register_sglang_routes, sglang_model_info_keys, sglang_server_info_keys
from radixlm.runtime.server.request_errors import RequestError
from radixlm.runtime.server.tokenizer_manager import TokenizerManager
from radixlm.runtime.prompt_format import prompt_format_info
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.validation import RequestLimits, check_counts

_ERRORS_503 = {503: {"description": "unhealthy (the message says why)"}}


def _precheck_counts(prompt: Any, n: int | None, limits: RequestLimits) -> None:
    """Prompt count and n of an OpenAI request, before its prompts are tokenized (400 naming the field)."""
    num = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    try:
        check_counts(num, [n or 1] * num, limits, "prompt")
    except ValueError as e:
        raise RequestError(str(e)) from None


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
        try:
            info["scheduler_stats"] = await tm.get_stats(timeout=5.0)
        except asyncio.TimeoutError:  # a scheduler busy in a long step answers late: say so, do not fail
            info["scheduler_stats"] = dict(tm.last_stats, stale=True)
        return sglang_server_info_keys(info)


# --------------------------------------------------------------------------- errors
# --------------------------------------------------------------------------- app
def create_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="radixlm", version=radixlm.__version__, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    tm = ctx.tm
    app.add_middleware(GuardMiddleware, api_key=ctx.args.api_key, max_body_bytes=ctx.max_body_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        code = getattr(e, "code", None)  # e.g. model_not_found, as OpenAI names it
        return error_response(e.status, str(e), param=e.param, code=code,
                              err_type="invalid_request_error" if code else None)

    @app.exception_handler(pydantic.ValidationError)
    async def _pydantic_error(_: Request, e: pydantic.ValidationError) -> JSONResponse:
        return validation_error_response(e)

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
    @app.get("/health", responses=_ERRORS_503)
    async def health() -> Response:
        """200 while the server can serve: not dead, not starting, and the scheduler heartbeating (see
        --health-stall-timeout). Open without --api-key, so load balancers can probe it."""
        problem = tm.health_problem()
        if problem is not None:
            return error_response(503, f"unhealthy: {problem}")
        return Response(status_code=200)

    @app.get("/health_generate", responses=_ERRORS_503)
    async def health_generate() -> Response:
        """A real one-token generation through every process, within --health-stall-timeout seconds."""
        problem = tm.health_problem()
        if problem is not None:
            return error_response(503, f"unhealthy: {problem}")
        obj = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0.0})
        deadline = ctx.args.health_stall_timeout
        handle = None
        try:
            handle = await asyncio.wait_for(tm.submit(obj), timeout=deadline)
            await asyncio.wait_for(collect(handle), timeout=deadline)
        except (RequestError, asyncio.TimeoutError) as e:
            why = str(e) or f"timed out after {deadline:g} s"
            return error_response(503, f"unhealthy: a one-token generation failed: {why}")
        finally:
            if handle is not None:
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
        handle = await tm.submit(obj)
        single = len(handle.reqs) == 1 and not obj.is_batch
        if not obj.stream:
            try:
                gone, results = await until_disconnect(request, collect(handle))
            finally:
                handle.close()
            if gone:
                return Response(status_code=499)
            return JSONResponse(results[0] if single else results)
        gone, first = await start_stream(request, handle)
        if gone:
            return Response(status_code=499)
        return StreamingResponse(
            sse_guard(native_stream(chain(first, handle), native_streamers(ctx.args, handle.reqs), single), handle),
            media_type="text/event-stream", headers=SSE_HEADERS,
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

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await json_body(request)
        req = (TokenizeChatRequest if isinstance(body, dict) and "messages" in body else TokenizeRequest).model_validate(body)
        openai_api.check_model(req.model, model_names)
        return await tm.run_cpu(openai_api.tokenize, req, tm.tokenizer, ctx.chat, tm.model_info)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req = DetokenizeRequest.model_validate(await json_body(request))
        openai_api.check_model(req.model, model_names)
        return await tm.run_cpu(openai_api.detokenize, req, tm.tokenizer,
                                int(tm.model_info.get("vocab_size") or len(tm.tokenizer)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = CompletionRequest.model_validate(await json_body(request))
        openai_api.check_model(req.model, model_names)
        _precheck_counts(req.prompt, req.n, tm.limits)
        prep = await tm.run_cpu(openai_api.prepare_completion, req, tm.tokenizer, tm.model_info, ctx.model_name,
                                ctx.args.max_tokens_default_cap)
        return await _openai(request, prep, req,
                             lambda results: openai_api.completion_response(prep, req, results, tm.tokenizer),
                             lambda events: openai_api.stream_completion(prep, req, events, tm.tokenizer))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = ChatCompletionRequest.model_validate(await json_body(request))
        openai_api.check_model(req.model, model_names)
        _precheck_counts(None, req.n, tm.limits)
        prep = await tm.run_cpu(openai_api.prepare_chat, req, tm.tokenizer, ctx.chat, tm.model_info, ctx.model_name,
                                ctx.args.max_tokens_default_cap)
        return await _openai(request, prep, req,
                             lambda results: openai_api.chat_response(prep, req, results),
                             lambda events: openai_api.stream_chat(prep, req, events))

    async def _openai(request: Request, prep: Any, req: Any, build: Any, stream: Any) -> Response:
        handle = await tm.submit(prep.obj)
        if not req.stream:
            try:
                gone, results = await until_disconnect(request, collect(handle))
            finally:
                handle.close()
            return Response(status_code=499) if gone else JSONResponse(build(results))
        gone, first = await start_stream(request, handle)
        if gone:
            return Response(status_code=499)
        return StreamingResponse(sse_guard(stream(chain(first, handle)), handle),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    # /abort_request (abort_all), /concate_and_append_request, /encode, /model_info, /v1/(de)tokenize, ...
    register_sglang_routes(app, ctx, json_body)
    openapi_doc.install(app, {
        "/generate": GenerateReqInput,
        "/tokenize": [TokenizeRequest, TokenizeChatRequest],
        "/detokenize": DetokenizeRequest,
        "/v1/completions": CompletionRequest,
        "/v1/chat/completions": ChatCompletionRequest,
    })
    return app
