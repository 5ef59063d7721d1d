"""The router's HTTP face: the same API as one radixlm server, forwarded to the workers.

* ``/generate``, ``/v1/completions``, ``/v1/chat/completions`` (and any other POST whose body has a
  ``text``/``prompt``/``messages``): the policy picks a worker by the request's routing key; the body is
  forwarded byte for byte; a streaming answer is passed through chunk by chunk.
* **Failover**: a worker that refuses the connection or answers 503 (its scheduler is gone) is taken
  out, and the request goes to the next worker; so does a request whose connection failed in any other
  way before the answer began (nothing had reached the client), and that worker is health-checked at
  once (a refused connection takes it out). A worker that
  fails after it started answering ends that request with an error: a 502 body, or for a stream an SSE
  error event and ``[DONE]``, and is health-checked at once too. A request in flight on a worker that the health checks take out fails at
  once; nothing waits on a dead worker. No healthy worker: 503.
* ``/abort_request``: to the worker that holds the ``rid`` (every worker if the router does not know it);
  ``abort_all`` to every worker.
* ``/flush_cache``: every worker, and the router's trees are cleared. ``/get_model_info``,
  ``/v1/models`` and other reads: any healthy worker. ``/get_server_info``: the router's own (policy,
  workers, and the workers' stats summed in ``scheduler_stats``). ``/health``: 200 while a worker is.
* ``/add_worker?url=``, ``/remove_worker?url=`` (a removed worker finishes what it has), ``/list_workers``.
* Client disconnects propagate: the router closes its connection to the worker, which aborts.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import radixlm
from radixlm.router import request_key
from radixlm.router.args import RouterArgs, normalize_worker_url
from radixlm.router.metrics import RouterMetrics
from radixlm.router.policy import make_policy
from radixlm.router.workers import Worker, WorkerSet

logger = logging.getLogger("radixlm.router")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_TRANSPORT_ERRORS = (httpx.TransportError,)


class WorkerDied(Exception):
    pass


def error_response(status: int, message: str, param: Optional[str] = None) -> JSONResponse:
    err_type = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                502: "bad_gateway", 503: "service_unavailable", 504: "gateway_timeout"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                        status_code=status)


def _sse_error(message: str, status: int = 502) -> bytes:
    body = {"error": {"message": message, "type": "bad_gateway", "param": None, "code": status}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class _KeyMiddleware:
    """Pure-ASGI (streaming-safe) API-key check, as on a server: every route but /health."""

    def __init__(self, app: Any, api_key: Optional[str]):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.api_key and scope.get("path") != "/health":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                await error_response(401, "invalid or missing API key (Authorization: Bearer ...)")(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _race(dead: asyncio.Event, aw: Awaitable[Any], reason: Callable[[], Optional[str]]) -> Any:
    """Await ``aw`` unless the worker is taken out first (then WorkerDied)."""
    task = asyncio.ensure_future(aw)
    if dead.is_set():
        task.cancel()
        raise WorkerDied(reason() or "the worker is out of service")
    waiter = asyncio.ensure_future(dead.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise WorkerDied(reason() or "the worker is out of service")


async def _until_disconnect(request: Request, coro: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``coro``; (True, None) if the client went away first (``coro`` is cancelled)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return False, task.result()
        return True, None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class Router:
    """The state behind the routes: workers, policy, metrics, which worker holds which rid."""

    def __init__(self, args: RouterArgs):
        self.args = args
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(args.request_timeout_s, connect=args.connect_timeout_s),
            # idle connections are dropped before a worker's own keep-alive timeout (5 s) closes them
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0),
        )
        key = args.effective_worker_api_key
        self.worker_headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.workers = WorkerSet(args.worker_urls, self.client, self.worker_headers,
                                 args.health_check_interval_s, args.health_failure_threshold, args.max_tree_chars)
        self.policy = make_policy(args.policy, args.cache_aware, args.seed)
        self.metrics = RouterMetrics()
        self.rids: dict[str, Worker] = {}
        self._probes: set[asyncio.Future] = set()  # health checks started by a failed request
        self.started = time.time()

    async def start(self) -> None:
        await self.workers.check_all()
        self.workers.start()

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        await self.workers.stop()
        await self.client.aclose()

    def _headers(self, request: Request) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.worker_headers:
            h.update(self.worker_headers)
        elif request.headers.get("authorization"):
            h["Authorization"] = request.headers["authorization"]
        return h

    # ------------------------------------------------------------------ routed requests
    async def route(self, request: Request, path: str, raw: bytes, key: str, rids: list[str], stream: bool) -> Response:
        tried: set[str] = set()
        while True:
            candidates = [w for w in self.workers.available() if w.url not in tried]
            if not candidates:
                if tried:
                    return error_response(503, f"every worker failed for this request (tried {sorted(tried)})")
                return error_response(503, "no healthy worker to route to")
            decision = self.policy.select(key, candidates)
            w = candidates[decision.index]
            tried.add(w.url)
            self.metrics.decisions.labels(decision.reason).inc()
            self.metrics.requests.labels(w.url).inc()
            w.routed(key)
            for rid in rids:
                self.rids[rid] = w
            done = False
            try:
                req = self.client.build_request("POST", w.url + path, content=raw, headers=self._headers(request))
                dead = w.dead
                try:
                    resp = await _race(dead, self.client.send(req, stream=True), lambda: w.last_error)
                except httpx.TimeoutException as e:
                    if not isinstance(e, httpx.ConnectTimeout):
                        return error_response(504, f"worker {w.url} did not answer in time: {type(e).__name__}")
                    w.mark_down(f"{type(e).__name__}: {e}")
                    self._failed_attempt(w)
                    continue
                except (httpx.TransportError, WorkerDied) as e:
                    # Connection refused: the worker is gone. Any other failure before the answer's
                    # headers (e.g. the connection dropped): nothing reached the client, so the request
                    # goes to the next worker, and the health checks judge this one.
                    if isinstance(e, httpx.ConnectError):
                        w.mark_down(f"{type(e).__name__}: {e}")
                    elif not isinstance(e, WorkerDied):
                        # e.g. a pooled connection to a process that was killed: probe it now rather
                        # than at the next interval, so a dead worker is out before this answer is.
                        await self.workers.check(w)
                    self._failed_attempt(w)
                    continue
                if resp.status_code == 503:  # its scheduler is gone (or not up yet)
                    body = await resp.aread()
                    await resp.aclose()
                    w.mark_down(f"answered 503: {body[:200]!r}")
                    self._failed_attempt(w)
                    continue
                if stream and resp.status_code == 200:
                    done = True  # the stream's generator now owns the bookkeeping
                    return StreamingResponse(self._passthrough(w, dead, resp, key, rids),
                                             media_type=resp.headers.get("content-type", "text/event-stream"),
                                             headers=_SSE_HEADERS)
                gone, out = await _until_disconnect(request, self._read(w, dead, resp))
                if gone:
                    return Response(status_code=499)
                return out
            finally:
                if not done:
                    self._finish(w, key, rids, failed=False)

    def _probe_soon(self, w: Worker) -> None:
        """A health check of ``w`` in the background (a stream that broke must not wait for it)."""
        task = asyncio.ensure_future(self.workers.check(w))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    def _failed_attempt(self, w: Worker) -> None:
        w.errors_total += 1
        self.metrics.errors.labels(w.url).inc()
        self.metrics.failovers.inc()

    async def _read(self, w: Worker, dead: asyncio.Event, resp: httpx.Response) -> Response:
        try:
            content = await _race(dead, resp.aread(), lambda: w.last_error)
        except (_TRANSPORT_ERRORS + (WorkerDied,)) as e:
            w.errors_total += 1
            self.metrics.errors.labels(w.url).inc()
            return error_response(502, f"worker {w.url} failed while answering: {type(e).__name__}: {e}")
        finally:
            await resp.aclose()
        return Response(content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    async def _passthrough(self, w: Worker, dead: asyncio.Event, resp: httpx.Response, key: str,
                           rids: list[str]) -> AsyncIterator[bytes]:
        it = resp.aiter_raw()
        failed = False
        at_boundary = True  # the bytes so far end between two SSE events
        try:
            while True:
                try:
                    chunk = await _race(dead, it.__anext__(), lambda: w.last_error)
                except StopAsyncIteration:
                    return
                except (_TRANSPORT_ERRORS + (WorkerDied,)) as e:
                    failed = True  # the health checks decide whether the worker itself is gone
                    self.metrics.errors.labels(w.url).inc()
                    if not isinstance(e, WorkerDied):  # at once, not at the next interval
                        self._probe_soon(w)
                    # a torn event is ended first, so the error is an event of its own
                    yield (b"" if at_boundary else b"\n\n") + _sse_error(
                        f"worker {w.url} failed during the stream: {type(e).__name__}: {e}")
                    return
                if chunk:
                    at_boundary = chunk.endswith(b"\n\n")
                yield chunk
        finally:
            await resp.aclose()
            self._finish(w, key, rids, failed=failed)

    def _finish(self, w: Worker, key: str, rids: list[str], failed: bool) -> None:
        w.finished(key, failed)
        for rid in rids:
            if self.rids.get(rid) is w:
                del self.rids[rid]
        self.workers.forget_if_drained(w)

    # ------------------------------------------------------------------ fan-out and reads
    async def any_worker(self, request: Request, method: str, path: str, raw: bytes = b"") -> Response:
        """A request any worker can answer (model info, parsers): the first healthy one, failing over."""
        for w in self.workers.available():
            try:
                r = await self.client.request(method, w.url + path, content=raw or None, headers=self._headers(request),
                                              params=request.query_params, timeout=30.0)
            except httpx.TransportError as e:
                if isinstance(e, httpx.ConnectError):
                    w.mark_down(f"{type(e).__name__}: {e}")
                continue
            return Response(r.content, status_code=r.status_code,
                            media_type=r.headers.get("content-type", "application/json"))
        return error_response(503, "no healthy worker to route to")

    async def broadcast(self, request: Request, path: str, body: Optional[dict] = None,
                        targets: Optional[list[Worker]] = None) -> list[tuple[Worker, Optional[httpx.Response]]]:
        ws = self.workers.available() if targets is None else targets

        async def one(w: Worker) -> tuple[Worker, Optional[httpx.Response]]:
            try:
                return w, await self.client.post(w.url + path, json=body, headers=self._headers(request), timeout=30.0)
            except httpx.TransportError as e:
                if isinstance(e, httpx.ConnectError):
                    w.mark_down(f"{type(e).__name__}: {e}")
                return w, None

        return list(await asyncio.gather(*(one(w) for w in ws)))

    def server_info(self) -> dict:
        a = self.args
        return {
            "router": True, "version": radixlm.__version__, "policy": a.policy,
            "cache_threshold": a.cache_threshold, "balance_abs_threshold": a.balance_abs_threshold,
            "balance_rel_threshold": a.balance_rel_threshold, "spread_threshold": a.spread_threshold,
            "zmq_frontdoor": None,  # DSL clients reach a router over HTTP
            "workers": [w.describe() for w in self.workers.workers.values()],
            "scheduler_stats": self.workers.aggregate_stats(),
            "uptime_s": time.time() - self.started,
        }


async def _raw_json(request: Request) -> tuple[bytes, Optional[dict]]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw, None  # the worker answers with the precise 400
    return raw, body if isinstance(body, dict) else None


def create_app(router: Router) -> FastAPI:
    app = FastAPI(title="radixlm router", version=radixlm.__version__, docs_url=None, redoc_url=None)
    app.state.router = router
    app.add_middleware(_KeyMiddleware, api_key=router.args.api_key)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return error_response(500, f"internal router error: {type(e).__name__}: {e}")

    async def routed(request: Request, path: str, key_of: Callable[[dict], str]) -> Response:
        raw, body = await _raw_json(request)
        body = body or {}
        return await router.route(request, path, raw, key_of(body), request_key.request_rids(body),
                                  bool(body.get("stream")))

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await routed(request, "/generate", request_key.generate_key)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await routed(request, "/v1/completions", request_key.completion_key)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await routed(request, "/v1/chat/completions", request_key.chat_key)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        _, body = await _raw_json(request)
        if (body or {}).get("abort_all") is True:  # SGLang's abort_all: every worker aborts everything
            replies = await router.broadcast(request, "/abort_request", {"abort_all": True})
            ok = [r.json() for _, r in replies if r is not None and r.status_code == 200]
            return JSONResponse({"success": bool(replies) and len(ok) == len(replies),
                                 "aborted": sum(int(o.get("aborted", 0)) for o in ok)})
        rid = (body or {}).get("rid")
        if not isinstance(rid, str) or not rid:
            return error_response(400, "rid: a non-empty string is required", param="rid")
        holder = router.rids.get(rid)
        replies = await router.broadcast(request, "/abort_request", {"rid": rid},
                                         targets=[holder] if holder is not None else None)
        ok = any(r is not None and r.status_code == 200 and r.json().get("success") for _, r in replies)
        return JSONResponse({"success": ok})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request) -> Response:
        replies = await router.broadcast(request, "/flush_cache")
        ok = bool(replies) and all(r is not None and r.status_code == 200 for _, r in replies)
        for w, r in replies:
            if r is not None and r.status_code == 200:
                w.tree.clear()
        msgs = [f"{w.url}: {'unreachable' if r is None else r.json().get('message', r.status_code)}" for w, r in replies]
        return JSONResponse({"success": ok, "message": "; ".join(msgs)}, status_code=200 if ok else 400)

    @app.get("/health")
    async def health() -> Response:
        if not router.workers.available():
            return error_response(503, "unhealthy: no healthy worker")
        return Response(status_code=200)

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> dict:
        return router.server_info()

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(router.metrics.render(router.workers), media_type=CONTENT_TYPE_LATEST)

    @app.get("/list_workers")
    async def list_workers() -> dict:
        ws = list(router.workers.workers.values())
        return {"urls": [w.url for w in ws if not w.removed], "workers": [w.describe() for w in ws]}

    async def _url_param(request: Request) -> str:
        url = request.query_params.get("url")
        if url is None:
            _, body = await _raw_json(request)
            url = (body or {}).get("url")
        return normalize_worker_url(url)

    @app.post("/add_worker")
    async def add_worker(request: Request) -> Response:
        try:
            url = await _url_param(request)
        except ValueError as e:
            return error_response(400, str(e), param="url")
        w = router.workers.add(url)
        healthy = await router.workers.check(w)
        return JSONResponse({"success": True, "url": url, "healthy": healthy, "last_error": w.last_error})

    @app.post("/remove_worker")
    async def remove_worker(request: Request) -> Response:
        try:
            url = await _url_param(request)
        except ValueError as e:
            return error_response(400, str(e), param="url")
        w = router.workers.remove(url)
        if w is None:
            return error_response(404, f"url: no worker {url}", param="url")
        return JSONResponse({"success": True, "url": url, "in_flight": w.load})

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request, path: str) -> Response:
        """Anything else: a body with a prompt is routed like a generation; the rest goes to any worker."""
        if request.method == "POST":
            raw, body = await _raw_json(request)
            if body is not None and any(k in body for k in ("text", "input_ids", "prompt", "messages")):
                key = (request_key.chat_key(body) if "messages" in body else request_key.completion_key(body)
                       if "prompt" in body else request_key.generate_key(body))
                return await router.route(request, "/" + path, raw, key, request_key.request_rids(body),
                                          bool(body.get("stream")))
            return await router.any_worker(request, "POST", "/" + path, raw)
        return await router.any_worker(request, "GET", "/" + path)

    return app
