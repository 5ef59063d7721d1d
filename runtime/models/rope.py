"""Rotary position embeddings, with frequencies computed by transformers' own rope utilities.

Using ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (linear, dynamic, yarn, llama3, ...) keeps
our inverse frequencies bit-identical to the reference for every scaling type transformers knows.

``dynamic`` (NTK) scaling: transformers recomputes the base on every forward from the batch's longest
sequence, which a paged KV cache cannot follow (keys already cached were rotated with the old base). We
use the SGLang/vLLM convention instead: one fixed base, computed for ``max_position_embeddings * factor``.
``longrope`` switches frequencies by sequence length for the same reason and is rejected.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_parameters(config) -> dict:
    """The config's rope parameters in transformers-v5 form (``rope_type``, ``rope_theta``, ...)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers < 5 keeps rope_theta / rope_scaling as attributes
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """``(inv_freq [D/2] float32, attention_scaling)`` for ``config`` (on CPU)."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_parameters.partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        base = params["rope_theta"]
        # Same expression as transformers' compute_default_rope_parameters, for identical rounding.
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type == "longrope":
        raise ValueError("rope_parameters.rope_type 'longrope' is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_parameters.rope_type {rope_type!r} is not supported")
    fn = ROPE_INIT_FUNCTIONS[rope_type]
    with torch.device("cpu"):  # the loader may have a meta/cuda default device active
        if rope_type == "dynamic":
            seq_len = int(config.max_position_embeddings * params["factor"])
            inv_freq, scaling = fn(config, torch.device("cpu"), seq_len=seq_len)
        else:
            inv_freq, scaling = fn(config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q/k by absolute position; cos/sin are computed once per forward pass."""

    def __init__(self, config, device: torch.device | str):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # [D/2] float32

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] → cos, sin [T, 1, D/2] in ``dtype`` (float32 math, then cast, as transformers)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, D/2]
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated in the rotate-half (GPT-NeoX) layout that HF Llama checkpoints use."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
