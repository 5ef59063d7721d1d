"""SGLang's native routes beyond /generate, and the /get_model_info and /get_server_info keys SGLang's
frontend and ``bench_serving`` read.

Routes: ``/abort_request`` (one ``rid`` or ``abort_all``), ``/concate_and_append_request`` (SGLang's
parallel-encoding join: the frontend has already joined the branches' text; radixlm keeps no per-rid
KV to splice, and the next request's prompt finds the shared prefix in the radix cache, so the
route checks the body and answers at once), ``/encode`` and ``/v1/embeddings`` (a 400: radixlm serves
generation models), ``/v1/tokenize`` and ``/v1/detokenize`` (the vLLM-shaped ``/tokenize`` and
``/detokenize`` of http_server.py under SGLang's names), ``/model_info``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from radixlm.runtime.server.request_errors import RequestError


def _str_list(body: dict, name: str) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RequestError(f"{name}: a list of non-empty strings is required", param=name)
    return value


def register_sglang_routes(app: FastAPI, ctx: Any, json_body: Any) -> None:
    """Add the routes to ``app``. ``ctx``: the server's ServerContext; ``json_body``: its body parser."""
    tm = ctx.tm

    @app.post("/abort_request")
    async def abort_request(request: Request) -> dict:
        body = await json_body(request)
        abort_all = body.get("abort_all", False)
        if not isinstance(abort_all, bool):
            raise RequestError("abort_all: a boolean is required", param="abort_all")
        if abort_all:
            return {"success": True, "aborted": tm.abort_all()}
        rid = body.get("rid")
        if not isinstance(rid, str) or not rid:
            raise RequestError("rid: a non-empty string is required (or abort_all: true)", param="rid")
        return {"success": tm.abort(rid)}

    @app.post("/concate_and_append_request")
    async def concate_and_append_request(request: Request) -> dict:
        body = await json_body(request)
        _str_list(body, "src_rids")
        dst = body.get("dst_rid")
        if not isinstance(dst, str) or not dst:
            raise RequestError("dst_rid: a non-empty string is required", param="dst_rid")
        return {"success": True, "message": "text join: the next request reuses the shared prefix from the radix cache"}

    @app.api_route("/encode", methods=["POST"])
    @app.api_route("/v1/embeddings", methods=["POST"])
    async def encode(request: Request) -> None:
        await json_body(request)
        raise RequestError(f"this server serves a generation model ({ctx.model_name}); it computes no embeddings "
                           "(SGLang's /encode and /v1/embeddings need an embedding model)")

    # vLLM's /tokenize and /detokenize (http_server.py) under SGLang's /v1/ names too
    for path in ("/tokenize", "/detokenize"):
        route = next((r for r in app.routes if getattr(r, "path", None) == path), None)
        if route is not None:
            app.add_api_route("/v1" + path, route.endpoint, methods=["POST"])

    @app.api_route("/start_profile", methods=["GET", "POST"])
    @app.api_route("/stop_profile", methods=["GET", "POST"])
    async def profile(request: Request) -> JSONResponse:
        """Torch profiler in the scheduler process; stop writes a Chrome trace (its path is returned)."""
        body = await json_body(request) if request.method == "POST" and (await request.body()).strip() else {}
        output_dir = body.get("output_dir") or ""
        if not isinstance(output_dir, str):
            raise RequestError("output_dir: a folder path is required", param="output_dir")
        action = "start" if request.url.path == "/start_profile" else "stop"
        out = await tm.profile(action, output_dir)
        if not out.success:
            raise RequestError(out.message)
        return JSONResponse({"success": True, "message": out.message})

    @app.get("/model_info")
    async def model_info() -> dict:
        return ctx.model_info()


@lru_cache(maxsize=8)
def _hf_config(model_path: str) -> dict:
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def sglang_model_info_keys(info: dict) -> dict:
    """The /get_model_info keys SGLang 0.5 publishes that radixlm's own info lacks."""
    hf_config = _hf_config(str(info.get("model_path") or ""))
    extra = {
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": (hf_config or {}).get("model_type"),
        "architectures": (hf_config or {}).get("architectures"),
    }
    return {**extra, **info}


def sglang_server_info_keys(info: dict) -> dict:
    """The /get_server_info keys SGLang's frontend and bench_serving read (SGLang's scheduler_info and
    ``internal_states``), derived from radixlm's model info and live scheduler stats."""
    stats = info.get("scheduler_stats") or {}
    model = info.get("model_info") or {}
    total = stats.get("max_total_tokens", model.get("max_total_tokens"))
    ctx_len = model.get("context_length")
    info["max_total_num_tokens"] = total
    info["max_req_input_len"] = None if ctx_len is None else ctx_len - 1
    info["internal_states"] = [{
        "last_gen_throughput": stats.get("gen_throughput", 0.0),
        "avg_spec_accept_length": None,  # no speculative decoding
        "effective_max_running_requests_per_dp": info.get("max_running_requests"),
        "memory_usage": {
            "token_capacity": total,
            "token_usage": stats.get("token_usage"),
            "free_tokens": stats.get("free_tokens"),
            "evictable_tokens": stats.get("evictable_tokens"),
        },
        "num_running_reqs": stats.get("num_running_reqs"),
        "num_waiting_reqs": stats.get("num_waiting_reqs"),
    }]
    return info
