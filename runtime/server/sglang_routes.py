"""SGLang's native routes beyond /generate, and the /get_model_info and /get_server_info keys SGLang's
frontend and ``bench_serving`` read.

Routes: ``/abort_request`` (one ``rid`` or ``abort_all``), ``/concate_and_append_request`` (SGLang's
parallel-encoding join: the frontend has already joined the branches' text; radixlm keeps no per-rid
KV to splice, and the next request's prompt finds the shared prefix in the radix cache, so the
route checks the body and answers at once), ``/encode`` (a 400: radixlm serves generation models),
``/tokenize``, ``/detokenize`` (also under ``/v1/``), ``/model_info``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request

from radixlm.runtime.server.tokenizer_manager import RequestError


def _str_list(body: dict, name: str) -> list[str]:
    value = body.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RequestError(f"{name}: a list of non-empty strings is required", param=name)
    return value


def _token_ids(value: Any, name: str, vocab_size: int | None) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"{name}: a list of token ids is required", param=name)
    bad = [t for t in value if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise RequestError(f"{name}: token id {bad[0]} is out of the vocabulary [0, {vocab_size})", param=name)
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

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await json_body(request)
        prompt = body.get("prompt", body.get("text"))
        add_special = body.get("add_special_tokens", True)
        if not isinstance(add_special, bool):
            raise RequestError("add_special_tokens: a boolean is required", param="add_special_tokens")
        tok = tm.tokenizer
        if isinstance(prompt, str):
            ids = tok(prompt, add_special_tokens=add_special).input_ids
            return {"tokens": ids, "count": len(ids), "max_model_len": tm.model_info.get("context_length")}
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            ids_list = [tok(p, add_special_tokens=add_special).input_ids for p in prompt]
            return {"tokens": ids_list, "count": [len(x) for x in ids_list],
                    "max_model_len": tm.model_info.get("context_length")}
        raise RequestError("prompt: a string or a non-empty list of strings is required", param="prompt")

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await json_body(request)
        tokens = body.get("tokens")
        skip = body.get("skip_special_tokens", True)
        if not isinstance(skip, bool):
            raise RequestError("skip_special_tokens: a boolean is required", param="skip_special_tokens")
        vocab = tm.model_info.get("vocab_size")
        if isinstance(tokens, list) and tokens and all(isinstance(t, list) for t in tokens):
            seqs = [_token_ids(t, "tokens", vocab) for t in tokens]
            return {"text": [tm.tokenizer.decode(s, skip_special_tokens=skip) for s in seqs]}
        ids = _token_ids(tokens, "tokens", vocab)
        return {"text": tm.tokenizer.decode(ids, skip_special_tokens=skip)}

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
