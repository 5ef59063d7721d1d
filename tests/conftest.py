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

from radixlm.runtime.child_process import bind_hub_kernels

bind_hub_kernels()  # pytest keeps the repository root on sys.path: our kernels/ must not answer transformers

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


def _checkable(eng) -> bool:
    return eng._thread.is_alive() and eng._error is None


_created: list = []  # weak references to the Engines created during the current test


@pytest.fixture(autouse=True, scope="session")
def _every_engine_checks_the_kv_invariant_at_shutdown():
    """Every Engine a test creates, fixture or not, asserts the KV invariant (device pool and every
    KV tier: host slots, disk writer) before it shuts down; engines still running at the end of a
    test are checked by the fixture below."""
    import weakref

    from radixlm.runtime.engine import Engine

    init, shutdown = Engine.__init__, Engine.shutdown

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _created.append(weakref.ref(self))

    def checked_shutdown(self):
        try:
            if _checkable(self):
                self.check_memory()
        finally:
            shutdown(self)

    Engine.__init__, Engine.shutdown = tracked_init, checked_shutdown
    yield
    Engine.__init__, Engine.shutdown = init, shutdown


@pytest.fixture(autouse=True)
def _check_kv_invariant_after_engine_tests(request):
    """After every test that used an Engine (a fixture, or one it made and left running): free +
    evictable + protected == total, and every KV tier balances (``Engine.check_memory``)."""
    _created.clear()
    yield
    engines = [e for e in (ref() for ref in _created) if e is not None]
    _created.clear()
    for name in request.fixturenames:
        if name.startswith("_") or name == "request":
            continue
        try:
            value = request.getfixturevalue(name)
        except Exception:  # noqa: BLE001 - fixtures that failed to set up have nothing to check
            continue
        engines.extend(_engines_in(value))
    seen: set[int] = set()
    for eng in engines:
        if id(eng) not in seen and _checkable(eng):
            seen.add(id(eng))
            eng.check_memory()
