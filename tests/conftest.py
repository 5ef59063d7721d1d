"""Shared fixtures: tiny model directories (built locally, cached per session) and the KV check.

CI has no GPU: Triton kernels run in the interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, hence here).
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def _make(model_cache_dir, arch: str, preset: str = "tiny", family: str = "chatml") -> str:
    from radixlm.runtime.tiny_model import make_tiny_model

    path = model_cache_dir / (f"{arch}-{preset}" if family == "chatml" else f"{arch}-{preset}-{family}")
    if not (path / "config.json").exists():
        make_tiny_model(str(path), arch=arch, preset=preset, seed=0, chat_template_family=family)
    return str(path)


@pytest.fixture(scope="session")
def make_model(model_cache_dir):
    """make_model(arch="llama", preset="tiny", family="chatml") -> path of a cached tiny model directory
    (``family``: its chat template, see ``runtime/tiny_chat_templates.py``)."""

    def factory(arch: str = "llama", preset: str = "tiny", family: str = "chatml") -> str:
        return _make(model_cache_dir, arch, preset, family)

    return factory


@pytest.fixture(scope="session")
def tiny_llama(make_model) -> str:
    return make_model("llama")


def _engines_in(value):
    from radixlm.runtime.engine import Engine

    if isinstance(value, Engine):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _engines_in(v)


@pytest.fixture(autouse=True)
def _check_kv_invariant_after_engine_tests(request):
    """After every test that used an Engine fixture: free + evictable + protected == total."""
    yield
    for name in request.fixturenames:
        if name.startswith("_") or name == "request":
            continue
        try:
            value = request.getfixturevalue(name)
        except Exception:  # noqa: BLE001 - fixtures that failed to set up have nothing to check
            continue
        for eng in _engines_in(value):
            if eng._thread.is_alive():
                eng.check_memory()
