"""radixlm: structured generation with RadixAttention (SGLang-compatible frontend).

``import radixlm as sgl`` gives SGLang's frontend API: ``@sgl.function`` programs with ``gen``,
``select``, roles and ``fork``, run against ``sgl.Runtime``/``sgl.RuntimeEndpoint`` (a radixlm
server), ``sgl.OpenAI`` (any OpenAI-compatible server) or an in-process ``sgl.Engine``.

Every public name is resolved lazily (module ``__getattr__`` over ``_LAZY``): this package is also
the parent of ``radixlm.runtime``, so every runtime process imports it first, and the runtime must
not pay for (or depend on) the DSL's interpreter, its backends and ``requests`` to start. The first
``sgl.gen`` (or ``from radixlm import gen``) imports what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Eager, and cheap (a dataclass): ``radixlm.global_config`` is also a submodule's name, and importing
# that submodule would otherwise leave the module, not the settings object, as this attribute.
from radixlm.global_config import global_config  # noqa: E402

# public name → the module that defines it (SGLang's names, plus radixlm's ChatTemplate helpers,
# EngineBackend, BaseBackend and the program-state types)
_LAZY: dict[str, str] = {
    # the language (radixlm.api)
    "Runtime": "radixlm.api",
    "assistant": "radixlm.api",
    "assistant_begin": "radixlm.api",
    "assistant_end": "radixlm.api",
    "flush_cache": "radixlm.api",
    "function": "radixlm.api",
    "gen": "radixlm.api",
    "gen_int": "radixlm.api",
    "gen_string": "radixlm.api",
    "get_server_info": "radixlm.api",
    "select": "radixlm.api",
    "separate_reasoning": "radixlm.api",
    "set_default_backend": "radixlm.api",
    "system": "radixlm.api",
    "system_begin": "radixlm.api",
    "system_end": "radixlm.api",
    "user": "radixlm.api",
    "user_begin": "radixlm.api",
    "user_end": "radixlm.api",
    # backends
    "BaseBackend": "radixlm.backend.base_backend",
    "EngineBackend": "radixlm.backend.engine_backend",
    "RuntimeEndpoint": "radixlm.backend.runtime_endpoint",
    "OpenAI": "radixlm.backend.openai",  # imports the openai package
    # choice methods, chat templates, program state
    "greedy_token_selection": "radixlm.choices",
    "token_length_normalized": "radixlm.choices",
    "unconditional_likelihood_normalized": "radixlm.choices",
    "ChatTemplate": "radixlm.chat_template",
    "get_chat_template": "radixlm.chat_template",
    "ProgramError": "radixlm.state",
    "ProgramState": "radixlm.state",
    # the runtime, as SGLang exposes it at the top (torch and the model code load on first use)
    "Engine": "radixlm.runtime.engine",
    "ServerArgs": "radixlm.runtime.server_args",
}

__all__ = ["__version__", "global_config", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'radixlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what static checkers and IDEs should see
    from radixlm.api import (  # noqa: F401
        Runtime,
        assistant,
        assistant_begin,
        assistant_end,
        flush_cache,
        function,
        gen,
        gen_int,
        gen_string,
        get_server_info,
        select,
        separate_reasoning,
        set_default_backend,
        system,
        system_begin,
        system_end,
        user,
        user_begin,
        user_end,
    )
    from radixlm.backend.base_backend import BaseBackend  # noqa: F401
    from radixlm.backend.engine_backend import EngineBackend  # noqa: F401
    from radixlm.backend.openai import OpenAI  # noqa: F401
    from radixlm.backend.runtime_endpoint import RuntimeEndpoint  # noqa: F401
    from radixlm.chat_template import ChatTemplate, get_chat_template  # noqa: F401
    from radixlm.choices import (  # noqa: F401
        greedy_token_selection,
        token_length_normalized,
        unconditional_likelihood_normalized,
    )
    from radixlm.runtime.engine import Engine  # noqa: F401
    from radixlm.runtime.server_args import ServerArgs  # noqa: F401
    from radixlm.state import ProgramError, ProgramState  # noqa: F401
