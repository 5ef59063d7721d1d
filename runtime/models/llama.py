"""One Llama-family decoder for LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM.

The three differ only in switches read from the Hugging Face config:
  * Qwen2: bias on q/k/v (not o); Llama: ``attention_bias`` on q/k/v/o and ``mlp_bias``; Mistral: none.
  * ``tie_word_embeddings``: the lm_head shares the embedding matrix.
  * RoPE scaling (see rope.py), GQA (``num_key_value_heads``), explicit ``head_dim``.

Parameters keep the checkpoint's names except two fusions done at load time (see ``stacked_params``):
q/k/v → ``qkv_proj`` and gate/up → ``gate_up_proj``, so each layer runs 4 matmuls instead of 7.

The model knows nothing of the scheduler: it reads ``fb.input_ids`` / ``fb.positions`` and hands q/k/v
to the attention backend, which stores K/V in the paged pool and attends through ``req_to_token``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.runtime.attention.base import AttentionBackend
from radixlm.runtime.forward_batch import ForwardBatch
from radixlm.runtime.models.decoder_ops import EAGER, DecoderOps
from radixlm.runtime.models.rope import RotaryEmbedding

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops: DecoderOps = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config, layer_id: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.sm_scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.ops: DecoderOps = EAGER

    def forward(self, x, cos, sin, fb: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.ops.rope(q.view(T, self.num_heads, self.head_dim), cos, sin)  # [T, Hq, D]
        k = self.ops.rope(k.view(T, self.num_kv_heads, self.head_dim), cos, sin)  # [T, Hkv, D]
        v = v.view(T, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        o = attn.forward(q, k, v, self.layer_id, fb, self.sm_scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, config, bias: bool):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu', got {config.hidden_act!r}")
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.ops: DecoderOps = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))  # [T, 2I] -> [T, I] -> [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool):
        super().__init__()
        self.self_attn = Attention(config, layer_id, qkv_bias, o_bias)
        self.mlp = MLP(config, mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, fb, attn) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, fb, attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, mlp_bias: bool, device):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, qkv_bias, o_bias, mlp_bias) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, device)

    def forward(self, fb: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Final hidden states [T, hidden] (before the final norm)."""
        h = self.embed_tokens(fb.input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb.cos_sin(fb.positions, h.dtype)  # [T, 1, D/2] each, shared by all layers
        for layer in self.layers:
            h = layer(h, cos, sin, fb, attn)
        return h


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 causal LM over a paged KV cache. ``forward`` returns float32 logits [N, V]."""

    # checkpoint name fragment → (our fused parameter fragment, shard index within it)
    stacked_params = (
        (".q_proj.", ".qkv_proj.", 0),
        (".k_proj.", ".qkv_proj.", 1),
        (".v_proj.", ".qkv_proj.", 2),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    )

    def __init__(self, config, device: torch.device | str = "cpu"):
        super().__init__()
        self.config = config
        model_type = getattr(config, "model_type", "llama")
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type == "qwen2" else attention_bias
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        window = getattr(config, "sliding_window", None)
        uses_window = getattr(config, "use_sliding_window", True)  # Qwen2 has a separate on/off switch
        if window is not None and uses_window and window < config.max_position_embeddings:
            logger.warning("sliding_window=%s is ignored: attention is full over the context", window)
        self.model = LlamaModel(config, qkv_bias, o_bias, mlp_bias, device)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The row-major [V, hidden] projection (before ``packed_linear.pack_linears`` replaces lm_head)."""
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    def shard_sizes(self, fused_name: str) -> list[int]:
        """Row sizes of the pieces stacked into a fused parameter (for the loader)."""
        if ".qkv_proj." in fused_name:
            a = self.model.layers[0].self_attn
            return [a.q_size, a.kv_size, a.kv_size]
        return [self.config.intermediate_size] * 2

    def final_hidden(self, fb: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Normed hidden states [N, hidden] of the rows that need logits (tensor parallelism reuses this)."""
        h = self.model(fb, attn)  # [T, hidden]
        idx = fb.logits_indices
        if idx is None:
            idx = torch.cumsum(fb.extend_lens, 0) - 1  # last new token of each request
        return self.model.norm(h[idx])  # [N, hidden]; the norm is per row, so select first

    def forward(self, fb: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        h = self.final_hidden(fb, attn)  # [N, hidden]
        logits = F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
        return logits.float()  # [N, V]
