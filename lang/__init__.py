"""radixlm: structured generation with RadixAttention (SGLang-compatible frontend).

``import radixlm as sgl`` gives SGLang's frontend API: ``@sgl.function`` programs with ``gen``,
``select``, roles and ``fork``, run against ``sgl.Runtime``/``sgl.RuntimeEndpoint`` (a radixlm
server), ``sgl.OpenAI`` (any OpenAI-compatible server) or an in-process ``sgl.Engine``.
"""

__version__ = "0.1.0"

from radixlm.api import (  # noqa: E402
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
from radixlm.backend.base_backend import BaseBackend  # noqa: E402
from radixlm.backend.engine_backend import EngineBackend  # noqa: E402
from radixlm.backend.runtime_endpoint import RuntimeEndpoint  # noqa: E402
from radixlm.chat_template import ChatTemplate, get_chat_template  # noqa: E402
from radixlm.choices import (  # noqa: E402
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixlm.global_config import global_config  # noqa: E402
from radixlm.state import ProgramError, ProgramState  # noqa: E402


def __getattr__(name: str):
    # The Engine imports torch and the model code, the OpenAI backend the openai package: only when asked.
    if name == "Engine":
        from radixlm.runtime.engine import Engine

        return Engine
    if name == "OpenAI":
        from radixlm.backend.openai import OpenAI

        return OpenAI
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")


__all__ = [
    "BaseBackend",
    "ChatTemplate",
    "Engine",
    "EngineBackend",
    "OpenAI",
    "ProgramError",
    "ProgramState",
    "Runtime",
    "RuntimeEndpoint",
    "__version__",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "gen_int",
    "gen_string",
    "get_chat_template",
    "get_server_info",
    "global_config",
    "greedy_token_selection",
    "select",
    "separate_reasoning",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
]
