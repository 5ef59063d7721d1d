"""Support for the language's server tests (no tests here): one radixlm server per test session.

Starting a server means three processes importing torch, which is slow on a small machine, so
tests/lang/test_lang_server.py and tests/examples/test_examples.py share one. It is started on first use and
shut down at interpreter exit (``Runtime`` registers that itself).
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_runtimes: dict[str, Any] = {}


def shared_runtime(model_path: str) -> Any:
    """A live ``radixlm.Runtime`` serving ``model_path`` (the same one for the whole session)."""
    import radixlm as sgl

    with _lock:
        rt = _runtimes.get(model_path)
        if rt is None or rt.process.poll() is not None:
            rt = sgl.Runtime(model_path=model_path, log_level="warning")
            _runtimes[model_path] = rt
        return rt


def scheduler_stats(info: dict) -> dict:
    """Cache statistics from /get_server_info (nested on the server, flat from an Engine)."""
    return info.get("scheduler_stats", info)
