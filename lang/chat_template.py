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
_PROBE = {"system": "QzSYSzQ", "user": "QzUSRzQ", "assistant": "QzASTzQ", "user2": "QzUSR2zQ"}


def _split(segment: str, probe: str) -> tuple[str, str]:
    i = segment.index(probe)  # ValueError when the template dropped or rewrote the content
    return segment[:i], segment[i + len(probe) :]


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a").input_ids
    except Exception:  # noqa: BLE001 - an odd tokenizer simply does not count as adding BOS
        return False
    return len(ids) > 0 and ids[0] == bos


def chat_template_from_tokenizer(tokenizer: Any, name: str = "tokenizer") -> Optional[ChatTemplate]:
    """Derive role prefixes/suffixes from ``tokenizer.apply_chat_template``; None if impossible.

    The leading BOS the template writes is dropped when the tokenizer adds BOS itself, because the
    runtime tokenizes the program text with special tokens (otherwise the prompt would start with two).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    bos = getattr(tokenizer, "bos_token", None) or ""
    strip_bos = bool(bos) and _adds_bos(tokenizer)

    def render(msgs: list[tuple[str, str]], gen: bool = False) -> str:
        text = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in msgs], tokenize=False, add_generation_prompt=gen
        )
        return text[len(bos) :] if strip_bos and text.startswith(bos) else text

    P = _PROBE
    try:
        try:
            t_base = render([("system", P["system"])])
            sys_prefix, sys_suffix = _split(t_base, P["system"])
            base = [("system", P["system"])]
        except Exception:  # noqa: BLE001 - a template that rejects system messages
            # System text is then written as plain text ahead of the first user turn.
            base, t_base, sys_prefix, sys_suffix = [], "", "", "\n\n"
        t_u = render(base + [("user", P["user"])])
        t_ua = render(base + [("user", P["user"]), ("assistant", P["assistant"])])
        t_uau = render(base + [("user", P["user"]), ("assistant", P["assistant"]), ("user", P["user2"])])
        if not (t_u.startswith(t_base) and t_ua.startswith(t_u) and t_uau.startswith(t_ua)):
            return None
        user_prefix, user_suffix = _split(t_uau[len(t_ua) :], P["user2"])
        if t_u[len(t_base) :] != user_prefix + P["user"] + user_suffix:
            return None  # the first user turn is written differently from later ones
        asst_prefix, asst_suffix = _split(t_ua[len(t_u) :], P["assistant"])
        t_gen = render(base + [("user", P["user"])], gen=True)
        if t_gen.startswith(t_u) and t_gen[len(t_u) :] not in ("", asst_prefix):
            return None  # generation prompt differs from history: not expressible as prefix/suffix
    except Exception as e:  # noqa: BLE001 - any template failure means "fall back"
        logger.debug("chat template derivation failed: %s", e)
        return None

    # A template that writes a system message when none is given (Qwen2): recover its text.
    default_system: Optional[str] = None
    if base:
        try:
            t_only_user = render([("user", P["user"])])
            lead = t_only_user[: t_only_user.index(user_prefix + P["user"])]
            if lead and lead.startswith(sys_prefix) and lead.endswith(sys_suffix):
                default_system = lead[len(sys_prefix) : len(lead) - len(sys_suffix)]
        except Exception:  # noqa: BLE001
            pass

    end_of_turn = asst_suffix.strip()
    stop_ids: tuple[int, ...] = ()
    if end_of_turn and hasattr(tokenizer, "convert_tokens_to_ids"):
        tid = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            stop_ids = (tid,)
    tpl = ChatTemplate(
        name=name,
        default_system_prompt=default_system,
        role_prefix_and_suffix={
            "system": (sys_prefix, sys_suffix),
            "user": (user_prefix, user_suffix),
            "assistant": (asst_prefix, asst_suffix),
        },
        stop_str=(end_of_turn,) if end_of_turn else (),
        stop_token_ids=stop_ids,
    )
    convo = [("user", "hi there"), ("assistant", "hello!"), ("user", "and now?")]
    if base:
        convo = [("system", "be brief")] + convo
    try:
        expected = render(convo, gen=True)
    except Exception:  # noqa: BLE001
        return None
    msgs = [{"role": r, "content": c} for r, c in convo]
    if tpl.get_prompt(msgs) + tpl.get_prefix_and_suffix("assistant", msgs)[0] != expected:
        return None
    return tpl


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
    "chat_template_from_tokenizer",
    "chat_template_registry",
    "get_chat_template",
    "get_chat_template_by_model_path",
    "load_local_tokenizer",
    "register_chat_template",
    "resolve_chat_template",
]

