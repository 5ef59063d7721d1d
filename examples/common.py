"""How the examples get a backend (quick_start.py does the same inline, to read on its own).

* ``RADIXLM_URL`` set: use that running server (``radixlm serve --model-path DIR``).
* otherwise: start a local runtime on ``RADIXLM_MODEL`` (default ``./tiny-model``, built on first use
  with random weights: the text is gibberish, the API is the point).

The tool-calling agents need a model whose chat template writes tool calls: ``RADIXLM_TOOLS_URL`` (a
server of such a model, e.g. ``radixlm serve --model-path Qwen2.5-7B-Instruct``), else a local runtime on
``RADIXLM_TOOLS_MODEL`` (default ``./tiny-model-qwen25``: a tiny Qwen2 with the Qwen2.5 tool template).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import radixlm as sgl


def tiny_model_path() -> str:
    path = os.environ.get("RADIXLM_MODEL", "tiny-model")
    if not os.path.exists(os.path.join(path, "config.json")):
        from radixlm.runtime.tiny_model import make_tiny_model

        print(f"building a tiny random model in {path} ...")
        make_tiny_model(path)
    return path


@contextmanager
def server() -> Iterator[str]:
    """The URL of a radixlm server for the duration of the block."""
    url = os.environ.get("RADIXLM_URL")
    if url:
        yield url
        return
    runtime = sgl.Runtime(model_path=tiny_model_path(), log_level="warning")
    try:
        yield runtime.url
    finally:
        runtime.shutdown()


@contextmanager
def tool_server() -> Iterator[str]:
    """The URL of a radixlm server whose model calls tools (see the module docstring)."""
    url = os.environ.get("RADIXLM_TOOLS_URL")
    if url:
        yield url
        return
    path = os.environ.get("RADIXLM_TOOLS_MODEL", "tiny-model-qwen25")
    if not os.path.exists(os.path.join(path, "config.json")):
        from radixlm.runtime.tiny_model import make_tiny_model

        print(f"building a tiny random tool-calling model in {path} ...")
        make_tiny_model(path, arch="qwen2", chat_template_family="qwen25")
    runtime = sgl.Runtime(model_path=path, log_level="warning")
    try:
        yield runtime.url
    finally:
        runtime.shutdown()


@contextmanager
def default_backend() -> Iterator[sgl.RuntimeEndpoint]:
    """Set a RuntimeEndpoint on :func:`server` as the default backend for the block."""
    with server() as url:
        backend = sgl.RuntimeEndpoint(url)
        sgl.set_default_backend(backend)
        try:
            yield backend
        finally:
            sgl.set_default_backend(None)
            backend.shutdown()
