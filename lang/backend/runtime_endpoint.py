"""``RuntimeEndpoint(url)``: a radixlm (or SGLang) server.

Program traffic goes over the server's ZeroMQ front door when it publishes one (``zmq_frontdoor`` in
``/get_server_info``): one persistent socket per thread, no HTTP parsing per request, and a dropped
program aborts its requests. A server without it (SGLang's) is driven over HTTP ``/generate``.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional, Union

import requests

from radixlm.backend.native import BackendError, NativeBackend
from radixlm.chat_template import ChatTemplate, chat_template_from_info, get_chat_template, resolve_chat_template

# An unreachable server (nothing listening, a black-holed address) is an error after this long, not a hang.
_CONNECT_TIMEOUT_S = 10.0


class RuntimeEndpoint(NativeBackend):
    def __init__(
        self,
        base_url: str,
        api_key: Optional[str] = None,
        verify: Optional[Any] = None,
        chat_template_name: Optional[str] = None,
        timeout: Optional[float] = None,
        use_zmq: bool = True,
    ):
        """``timeout``: seconds to wait for any one answer (None: no limit on an answer; over ZeroMQ the
        client's heartbeats still notice a dead server within seconds, over HTTP a server that cannot be
        reached fails within ``_CONNECT_TIMEOUT_S`` and one that dies drops the connection)."""
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.verify = verify
        self.timeout = timeout
        self._http_timeout = timeout if timeout is not None else (_CONNECT_TIMEOUT_S, None)
        self._http = requests.Session()
        if api_key:
            self._http.headers["Authorization"] = f"Bearer {api_key}"
        self.model_info = self._get("/get_model_info")
        info = self._get("/get_server_info")
        self.incremental_stream = bool(info.get("incremental_streaming_output"))
        self._client = None
        address = info.get("zmq_frontdoor") if use_zmq else None
        if address:
            from radixlm.runtime.server.client import FrontDoorClient

            self._client = FrontDoorClient(address, api_key=api_key, timeout=timeout)
        self.chat_template = self._resolve_chat_template(chat_template_name)

    def _resolve_chat_template(self, name: Optional[str]) -> ChatTemplate:
        """An explicit name wins; then the role template the server publishes (a radixlm server
        derives it from the model's own chat template); then, for servers that publish none (SGLang),
        a guess from the model's name. Never a tokenizer on this machine: the server's model path
        means nothing here (it may be relative to the server's folder, or absent)."""
        if name:
            return get_chat_template(name)
        served = chat_template_from_info(self.model_info.get("role_template"), f"server:{self.get_model_name()}")
        if served is not None:
            return served
        return resolve_chat_template(None, None, self.model_info.get("model_path"))

    # ------------------------------------------------------------------ HTTP helpers
    def _check(self, res: requests.Response) -> Any:
        if res.status_code != 200:
            try:
                body = res.json()
                message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body
            except ValueError:
                message = res.text
            raise BackendError(f"{res.request.method} {res.url}: {res.status_code} {message}")
        return res.json() if res.content else None

    def _get(self, path: str) -> Any:
        return self._check(self._http.get(self.base_url + path, verify=self.verify, timeout=self._http_timeout))

    # ------------------------------------------------------------------ transport
    def _request(self, data: dict[str, Any]) -> Union[dict, list[dict]]:
        if self._client is not None:
            return self._client.generate(data)
        return self._check(self._http.post(self.base_url + "/generate", json=data, verify=self.verify,
                                           timeout=self._http_timeout))

    def _request_stream(self, data: dict[str, Any]) -> Iterator[dict]:
        if self._client is not None:
            yield from self._client.generate_stream(data)
            return
        res = self._http.post(self.base_url + "/generate", json=data, stream=True, verify=self.verify,
                              timeout=self._http_timeout)
        if res.status_code != 200:
            self._check(res)
        for line in res.iter_lines():
            if not line or not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            yield json.loads(payload)

    # ------------------------------------------------------------------ server control
    def get_model_name(self) -> str:
        return self.model_info.get("model_path", "")

    def flush_cache(self, empty_cache: bool = True) -> Any:
        return self._check(self._http.post(self.base_url + "/flush_cache", verify=self.verify,
                                           timeout=self._http_timeout))

    def get_server_info(self) -> dict:
        return self._get("/get_server_info")

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
