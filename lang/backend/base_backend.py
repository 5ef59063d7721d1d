"""The backend interface the interpreter talks to.

A backend turns a program state's text into generations. ``s`` is the interpreter's
``StreamExecutor``: backends read ``s.text_`` (completion-style prompt) or ``s.messages_`` (chat
models) and never modify it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

from radixlm.chat_template import ChatTemplate, get_chat_template
from radixlm.choices import ChoicesDecision, ChoicesSamplingMethod

if TYPE_CHECKING:
    from radixlm.interpreter import StreamExecutor
    from radixlm.ir import SglSamplingParams


class BaseBackend:
    is_chat_model: bool = False
    support_concate_and_append: bool = False

    def __init__(self) -> None:
        self.chat_template: ChatTemplate = get_chat_template("default")

    def get_model_name(self) -> str:
        raise NotImplementedError

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    # ------------------------------------------------------------------ cache control
    def cache_prefix(self, prefix_str: str) -> None:
        """Compute and cache ``prefix_str`` (run_batch warm-up)."""

    def commit_lazy_operations(self, s: "StreamExecutor") -> None:
        """Compute and cache ``s.text_`` (before a fork)."""

    def begin_program(self, s: "StreamExecutor") -> None:
        pass

    def end_program(self, s: "StreamExecutor") -> None:
        pass

    # ------------------------------------------------------------------ generation
    def generate(
        self, s: "StreamExecutor", sampling_params: "SglSamplingParams"
    ) -> tuple[Union[str, list[str]], Any]:
        """Return (completion text, meta_info); lists of both when ``n`` > 1."""
        raise NotImplementedError

    def generate_stream(self, s: "StreamExecutor", sampling_params: "SglSamplingParams") -> Iterator[tuple[str, Any]]:
        """Yield (new text, meta_info so far). Default: one chunk from ``generate``."""
        comp, meta = self.generate(s, sampling_params)
        yield (comp[0] if isinstance(comp, list) else comp), meta

    def select(
        self,
        s: "StreamExecutor",
        choices: list[str],
        temperature: float,
        choices_method: Optional[ChoicesSamplingMethod] = None,
    ) -> ChoicesDecision:
        raise NotImplementedError

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ server control
    def flush_cache(self) -> Any:
        return None

    def get_server_info(self) -> Optional[dict]:
        return None

    def shutdown(self) -> None:
        pass
