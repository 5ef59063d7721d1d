"""An in-process backend over ``radixlm.runtime.engine.Engine`` (no server, no sockets).

SGLang has no such backend; it is handy for tests, notebooks and offline scripts. A program run with
``backend=engine`` (an Engine instance) is wrapped in one of these automatically.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Union

from radixlm.backend.native import NativeBackend
from radixlm.chat_template import resolve_chat_template


class EngineBackend(NativeBackend):
    def __init__(self, engine: Any = None, chat_template_name: Optional[str] = None, **engine_kwargs: Any):
        """Wrap ``engine``, or build one from ``engine_kwargs`` (``model_path=...`` and ServerArgs fields);
        an engine built here is shut down by ``shutdown()``."""
        super().__init__()
        if engine is None:
            from radixlm.runtime.engine import Engine

            engine = Engine(**engine_kwargs)
            self._owns_engine = True
        else:
            if engine_kwargs:
                raise ValueError(f"EngineBackend: engine given, so {sorted(engine_kwargs)} cannot apply")
            self._owns_engine = False
        self.engine = engine
        model_path = getattr(getattr(engine, "server_args", None), "model_path", None)
        self.model_path = model_path or "engine"
        self.chat_template = resolve_chat_template(chat_template_name, engine.tokenizer, model_path)

    def get_model_name(self) -> str:
        return self.model_path

    def _request(self, data: dict[str, Any]) -> Union[dict, list[dict]]:
        return self.engine.generate(**_engine_kwargs(data))

    def _request_stream(self, data: dict[str, Any]) -> Iterator[dict]:
        return self.engine.generate(**_engine_kwargs(data))

    def flush_cache(self) -> Any:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict:
        return self.engine.get_server_info()

    def shutdown(self) -> None:
        if self._owns_engine:
            self.engine.shutdown()


def _engine_kwargs(data: dict[str, Any]) -> dict[str, Any]:
    """A /generate body → Engine.generate keyword arguments (``text`` is called ``prompt`` there)."""
    kwargs = {k: v for k, v in data.items() if k != "text"}
    if "text" in data:
        kwargs["prompt"] = data["text"]
    return kwargs
