"""SGLang 0.5's /generate top-level fields that radixlm does not model, and what happens to each.

SGLang's own clients send some of these with every request (``Runtime.generate`` sends ``lora_path``
and ``session_id``; ``bench_serving`` sends ``lora_path`` and ``return_routed_experts``), almost always
null or false. ``split_sglang_extras`` removes them from a /generate body before the request model
sees it:

* ``INERT``: fields about a feature radixlm lacks whose null/false/empty value asks for nothing. Such a
  value is accepted (a warning is logged once per field); any other value is a ValueError naming the
  field, so a request never silently gets less than it asked for.
* ``BOOKKEEPING``: fields that never change the output (tracing, metrics labels, logging switches):
  accepted with any value, logged once.

Everything else (a typo, a field of no SGLang version) stays in the body and the request model rejects
it by name. The fields radixlm does implement (``rid`` lists, the ``return_logprob`` family, ``stream``,
...) are not listed here: they are ``GenerateReqInput``'s.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger("radixlm.sglang_compat")

# field → the feature radixlm lacks (said in the error when a non-empty value comes)
INERT: dict[str, str] = {
    "session_id": "sessions",
    "session_params": "sessions",
    "lora_path": "LoRA adapters",
    "lora_id": "LoRA adapters",
    "custom_logit_processor": "custom logit processors",
    "input_embeds": "input embeddings",
    "image_data": "multimodal inputs",
    "video_data": "multimodal inputs",
    "audio_data": "multimodal inputs",
    "modalities": "multimodal inputs",
    "mm_hashes": "multimodal inputs",
    "mm_content_hashes": "multimodal inputs",
    "use_audio_in_video": "multimodal inputs",
    "video_config": "multimodal inputs",
    "need_wait_for_mm_inputs": "multimodal inputs",
    "num_items_assigned": "multimodal inputs",
    "positional_embed_overrides": "positional embedding overrides",
    "return_hidden_states": "returning hidden states",
    "return_routed_experts": "mixture-of-experts routing (the models served are dense)",
    "routed_experts_start_len": "mixture-of-experts routing (the models served are dense)",
    "return_indexer_topk": "sparse-attention indexers",
    "return_sampling_mask": "returning sampling masks",
    "sampling_logprobs_mode": "logprob modes other than the model's raw log-softmax",
    "return_flat_raw_top_logprobs": "flat raw top logprobs",
    "return_flat_raw_output_top_logprobs": "flat raw top logprobs",
    "return_entropy": "returning entropy",
    "return_bytes": "returning bytes",
    "return_prompt_token_ids": "returning prompt token ids",
    "watermark": "watermarking",
    "bootstrap_host": "prefill/decode disaggregation",
    "bootstrap_port": "prefill/decode disaggregation",
    "bootstrap_room": "prefill/decode disaggregation",
    "bootstrap_pair_key": "prefill/decode disaggregation",
    "decode_tp_size": "prefill/decode disaggregation",
    "disagg_prefill_dp_rank": "prefill/decode disaggregation",
    "data_parallel_rank": "pinning a request to a data-parallel rank",
    "routed_dp_rank": "pinning a request to a data-parallel rank",
    "background": "background requests",
    "require_reasoning": "forced reasoning",
    "max_thinking_tokens": "thinking budgets",
}

BOOKKEEPING: frozenset[str] = frozenset({
    "log_metrics", "no_logs", "custom_labels", "external_trace_header", "received_time",
    "conversation_id", "routing_key", "http_worker_ipc",
})

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _is_empty(value: Any) -> bool:
    """Null, false, zero-length, or a per-prompt list of those (``lora_path: [null, null]``)."""
    if value is None or value is False or value == 0 and isinstance(value, int):
        return True
    if isinstance(value, (str, dict)) and not value:
        return True
    if isinstance(value, list):
        return all(_is_empty(v) for v in value)
    return False


def _warn_once(field: str, message: str) -> None:
    with _warned_lock:
        if field in _warned:
            return
        _warned.add(field)
    logger.warning(message)


def split_sglang_extras(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without the SGLang-only fields it may carry; ValueError naming a field whose value asks
    for a feature radixlm lacks. ``body`` itself is not modified."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in INERT:
            if not _is_empty(value):
                raise ValueError(f"{key}: radixlm does not support {INERT[key]}; send null (or omit it)")
            _warn_once(key, f"/generate: ignoring SGLang field {key}={value!r} ({INERT[key]} unsupported; "
                            "an empty value asks for nothing)")
        elif key in BOOKKEEPING:
            _warn_once(key, f"/generate: ignoring SGLang bookkeeping field {key} (it never changes the output)")
        else:
            out[key] = value
    return out
