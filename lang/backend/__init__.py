"""Backends: where a program's generations come from."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from radixlm.backend.base_backend import BaseBackend

_wrapped: "weakref.WeakKeyDictionary[Any, BaseBackend]" = weakref.WeakKeyDictionary()
_wrap_lock = threading.Lock()


def as_backend(obj: Any) -> BaseBackend:
    """A BaseBackend for ``obj``: a backend itself; a ``Runtime`` handle (a ``RuntimeEndpoint`` on its
    URL); or an in-process ``Engine`` (an ``EngineBackend``). Wrappers are made once per object."""
    if isinstance(obj, BaseBackend):
        return obj
    endpoint = getattr(obj, "endpoint", None)
    if isinstance(endpoint, BaseBackend):
        return endpoint
    if isinstance(getattr(obj, "url", None), str) and hasattr(obj, "shutdown"):
        from radixlm.backend.runtime_endpoint import RuntimeEndpoint

        return _wrap(obj, lambda: RuntimeEndpoint(obj.url, api_key=getattr(obj, "api_key", None)))
    if hasattr(obj, "generate") and hasattr(obj, "tokenizer"):
        from radixlm.backend.engine_backend import EngineBackend

        return _wrap(obj, lambda: EngineBackend(obj))
    raise ValueError(f"backend: {type(obj).__name__} is not a radixlm backend, Runtime or Engine")


def _wrap(obj: Any, make: Any) -> BaseBackend:
    with _wrap_lock:
        backend = _wrapped.get(obj)
        if backend is None:
            backend = make()
            _wrapped[obj] = backend
    return backend


__all__ = ["BaseBackend", "as_backend"]
