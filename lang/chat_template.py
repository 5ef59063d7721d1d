"""Chat templates: how a role (system / user / assistant) is written into the prompt text.

A program's text is plain text; roles add a prefix and a suffix around their content. Where those
come from, first match wins:

1. an explicit name (``RuntimeEndpoint(url, chat_template_name="chatml")``) from the small registry;
2. the model's own tokenizer: ``chat_template_from_tokenizer`` renders probe conversations with
   ``tokenizer.apply_chat_template`` and reads each role's prefix and suffix off the result, then
   checks that the derived template reproduces ``apply_chat_template`` exactly on a longer
   conversation (if not, the template is too dynamic to split into prefix/suffix and we fall back);
3. a name guessed from the model path (``llama-2`` → ``llama-2-chat`` ...);
4. ``default`` (``SYSTEM:`` / ``USER:`` / ``ASSISTANT:``, SGLang's default).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)


class ChatTemplateStyle(Enum):
    PLAIN = auto()
    LLAMA2 = auto()  # the system prompt lives inside the first [INST] block


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    default_system_prompt: Optional[str]
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    stop_str: tuple[str, ...] = ()
    # Token ids that end an assistant turn (derived from the tokenizer when it is known).
    stop_token_ids: tuple[int, ...] = ()
    image_token: str = "<image>"
    style: ChatTemplateStyle = ChatTemplateStyle.PLAIN

    def get_prefix_and_suffix(self, role: str, hist_messages: list[dict]) -> tuple[str, str]:
        """The text written before and after a message of ``role``, given the messages before it."""
        prefix, suffix = self.role_prefix_and_suffix.get(role, ("", ""))
        if self.style == ChatTemplateStyle.LLAMA2:
            if role == "system" and not hist_messages:
                user_prefix = self.role_prefix_and_suffix.get("user", ("", ""))[0]
                return user_prefix + prefix, suffix
            if role == "user" and len(hist_messages) == 1 and hist_messages[0]["role"] == "system":
                return "", suffix  # the [INST] was opened by the system message
        return prefix, suffix

    def get_prompt(self, messages: list[dict]) -> str:
        """Render OpenAI-format messages (no generation prompt)."""
        out = ""
        for i, m in enumerate(messages):
            content = m["content"]
            if m["role"] == "system" and content is None:
                content = self.default_system_prompt
                if content is None:
                    continue
            prefix, suffix = self.get_prefix_and_suffix(m["role"], messages[:i])
            out += f"{prefix}{content}{suffix}"
        return out


# --------------------------------------------------------------------------- registry (named fallbacks)
chat_template_registry: dict[str, ChatTemplate] = {}
_matchers: list[Callable[[str], Optional[str]]] = []


def register_chat_template(template: ChatTemplate) -> None:
    chat_template_registry[template.name] = template


def get_chat_template(name: str) -> ChatTemplate:
    try:
        return chat_template_registry[name]
    except KeyError:
        raise ValueError(
            f"chat_template: unknown name {name!r}; known: {sorted(chat_template_registry)}"
        ) from None


def get_chat_template_by_model_path(model_path: str) -> ChatTemplate:
    """Guess a registered template from a model name or path; ``default`` if nothing matches."""
    for match in _matchers:
        name = match(model_path.lower())
        if name is not None:
            return get_chat_template(name)
    return get_chat_template("default")


_CHATML = {
    "system": ("<|im_start|>system\n", "<|im_end|>\n"),
    "user": ("<|im_start|>user\n", "<|im_end|>\n"),
    "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
}
_LLAMA3 = {
    r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ("system", "user", "assistant")
}

for _t in (
    ChatTemplate("default", None, {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"), "assistant": ("ASSISTANT:", "\n")}),
    ChatTemplate("chatml", None, _CHATML, stop_str=("<|im_end|>",)),
    ChatTemplate("qwen", "You are a helpful assistant.", _CHATML, stop_str=("<|im_end|>",)),
    ChatTemplate(
        "llama-2-chat",
        None,
        {"system": ("<<SYS>>\n", "\n<</SYS>>\n\n"), "user": ("[INST] ", " [/INST]"), "assistant": ("", " </s><s>")},
        style=ChatTemplateStyle.LLAMA2,
    ),
    ChatTemplate("llama-3-instruct", None, _LLAMA3, stop_str=("<|eot_id|>",)),
    ChatTemplate(
        "mistral",
        None,
        {"system": ("[INST] ", "\n\n"), "user": ("[INST] ", " [/INST]"), "assistant": ("", "</s>")},
    ),
    ChatTemplate(
        "gemma-it",
        None,
        {"system": ("", ""), "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
         "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")},
    ),
    ChatTemplate(
        "vicuna_v1.1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        {"system": ("", " "), "user": ("USER:", " "), "assistant": ("ASSISTANT:", "</s>")},
    ),
):
    register_chat_template(_t)


def _match_by_name(path: str) -> Optional[str]:
    if "llama-3" in path and "instruct" in path:
        return "llama-3-instruct"
    if "llama-2" in path and "chat" in path:
        return "llama-2-chat"
    if ("mistral" in path or "mixtral" in path) and "instruct" in path:
        return "mistral"
    if "qwen" in path and ("chat" in path or "instruct" in path):
        return "qwen"
    if "gemma" in path and "it" in path.split("-"):
        return "gemma-it"
    if "vicuna" in path:
        return "vicuna_v1.1"
    if "chatml" in path or "hermes" in path or "yi-" in path:
        return "chatml"
    return None


_matchers.append(_match_by_name)


# --------------------------------------------------------------------------- derived from a tokenizer
def chat_template_from_tokenizer(tokenizer: Any, name: str = "tokenizer") -> Optional[ChatTemplate]:
    """The role prefixes/suffixes of ``tokenizer``'s own chat template; None if it cannot be split.

    The derivation lives in the runtime (``radixlm.runtime.prompt_format``), because a server publishes
    the same description in ``/get_model_info`` for clients that have no tokenizer of their own."""
    from radixlm.runtime.prompt_format import role_template_from_tokenizer

    return chat_template_from_info(role_template_from_tokenizer(tokenizer), name)


def chat_template_from_info(info: Optional[dict], name: str) -> Optional[ChatTemplate]:
    """A ChatTemplate from the ``role_template`` a server publishes (None when it published none)."""
    if not info:
        return None
    return ChatTemplate(
        name=name,
        default_system_prompt=info.get("default_system_prompt"),
        role_prefix_and_suffix={role: (pair[0], pair[1]) for role, pair in info["role_prefix_and_suffix"].items()},
        stop_str=tuple(info.get("stop_str", ())),
        stop_token_ids=tuple(info.get("stop_token_ids", ())),
    )


def resolve_chat_template(
    chat_template_name: Optional[str] = None,
    tokenizer: Any = None,
    model_path: Optional[str] = None,
) -> ChatTemplate:
    """Pick the chat template for a backend (see the module docstring for the order)."""
    if chat_template_name:
        return get_chat_template(chat_template_name)
    if tokenizer is not None:
        tpl = chat_template_from_tokenizer(tokenizer, name=f"tokenizer:{model_path or ''}")
        if tpl is not None:
            return tpl
    if model_path:
        return get_chat_template_by_model_path(model_path)
    return get_chat_template("default")


def load_local_tokenizer(model_path: Optional[str]) -> Any:
    """The tokenizer of a model directory on this machine, or None (never touches the network)."""
    import os

    if not model_path or not os.path.isdir(model_path):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the template then falls back to a named one
        logger.debug("could not load tokenizer from %s: %s", model_path, e)
        return None


__all__ = [
    "ChatTemplate",
    "ChatTemplateStyle",
    "chat_template_from_info",
    "chat_template_from_tokenizer",
    "chat_template_registry",
    "get_chat_template",
    "get_chat_template_by_model_path",
    "load_local_tokenizer",
    "register_chat_template",
    "resolve_chat_template",
]

