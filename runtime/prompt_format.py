"""What a client needs to render prompts exactly as this server's model expects them.

A DSL program writes roles as plain text around its content, so a client needs each role's prefix and
suffix. They come from the model's own chat template: :func:`role_template_from_tokenizer` renders probe
conversations with ``tokenizer.apply_chat_template``, reads each role's prefix and suffix off the
result, and checks that the split reproduces ``apply_chat_template`` exactly on a longer conversation
(otherwise the template is too dynamic to split, and it returns None). The server publishes that, the
Jinja template itself, the special tokens, stop strings and EOS ids in ``/get_model_info``
(:func:`prompt_format_info`), so a client never has to load a tokenizer, let alone resolve the server's
model path on its own disk.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)

_PROBE = {"system": "QzSYSzQ", "user": "QzUSRzQ", "assistant": "QzASTzQ", "user2": "QzUSR2zQ"}


def _split(segment: str, probe: str) -> tuple[str, str]:
    i = segment.index(probe)  # ValueError when the template dropped or rewrote the content
    return segment[:i], segment[i + len(probe) :]


def adds_bos(tokenizer: Any) -> bool:
    """Whether encoding plain text with special tokens starts with the tokenizer's BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a").input_ids
    except Exception:  # noqa: BLE001 - an odd tokenizer simply does not count as adding BOS
        return False
    return len(ids) > 0 and ids[0] == bos


def role_template_from_tokenizer(tokenizer: Any, chat_template: Optional[str] = None) -> Optional[dict]:
    """``{"role_prefix_and_suffix": {role: [prefix, suffix]}, "default_system_prompt", "stop_str",
    "stop_token_ids"}`` derived from the chat template (``chat_template`` overrides the tokenizer's);
    None if the template cannot be split into per-role prefixes and suffixes.

    The leading BOS the template writes is dropped when the tokenizer adds BOS itself, because the
    runtime tokenizes the program text with special tokens (otherwise the prompt would start with two).
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    bos = getattr(tokenizer, "bos_token", None) or ""
    strip_bos = bool(bos) and adds_bos(tokenizer)

    def render(msgs: list[tuple[str, str]], gen: bool = False) -> str:
        text = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in msgs], tokenize=False, add_generation_prompt=gen,
            chat_template=template,
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
    stop_ids: list[int] = []
    if end_of_turn and hasattr(tokenizer, "convert_tokens_to_ids"):
        tid = tokenizer.convert_tokens_to_ids(end_of_turn)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            stop_ids = [tid]
    roles = {"system": [sys_prefix, sys_suffix], "user": [user_prefix, user_suffix],
             "assistant": [asst_prefix, asst_suffix]}

    # The split must reproduce the real template on a longer conversation, generation prompt included.
    convo = [("user", "hi there"), ("assistant", "hello!"), ("user", "and now?")]
    if base:
        convo = [("system", "be brief")] + convo
    try:
        expected = render(convo, gen=True)
    except Exception:  # noqa: BLE001
        return None
    rendered = "".join(roles[r][0] + c + roles[r][1] for r, c in convo) + asst_prefix
    if rendered != expected:
        return None
    return {
        "role_prefix_and_suffix": roles,
        "default_system_prompt": default_system,
        "stop_str": [end_of_turn] if end_of_turn else [],
        "stop_token_ids": stop_ids,
    }


def load_chat_template(spec: str | None) -> str | None:
    """--chat-template: a Jinja file, a JSON file with a "chat_template" key, or the template text."""
    if not spec:
        return None
    if os.path.isfile(spec):
        with open(spec) as f:
            text = f.read()
        if spec.endswith(".json"):
            return json.loads(text)["chat_template"]
        return text
    if "{%" in spec or "{{" in spec:
        return spec
    raise ValueError(f"chat_template: {spec!r} is neither a file nor a Jinja template")


def prompt_format_info(tokenizer: Any, chat_template: Optional[str], eos_token_ids: list[int]) -> dict:
    """The ``/get_model_info`` keys that describe how prompts are written for this model."""
    special = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if getattr(tokenizer, name, None) is not None
    }
    template = chat_template or getattr(tokenizer, "chat_template", None)
    role_template = role_template_from_tokenizer(tokenizer, template) if template else None
    return {
        "chat_template": template,
        "role_template": role_template,
        "special_tokens": special,
        "additional_special_tokens": list(getattr(tokenizer, "additional_special_tokens", None) or []),
        "adds_bos_token": adds_bos(tokenizer),
        "stop_strings": role_template["stop_str"] if role_template else [],
        "eos_token_ids": list(eos_token_ids),
    }
