"""radixlm.runtime: the serving runtime (Engine, scheduler, server).

``from radixlm.runtime import Engine`` works as with ``sglang``; the import is lazy, so importing the
package (as every runtime process and the DSL do) does not load torch or the model code.
"""

from typing import Any

__all__ = ["Engine", "ServerArgs"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from radixlm.runtime.engine import Engine

        return Engine
    if name == "ServerArgs":
        from radixlm.runtime.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(f"module 'radixlm.runtime' has no attribute {name!r}")
