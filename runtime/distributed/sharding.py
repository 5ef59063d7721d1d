"""Module surgery: cut a loaded single-device Llama-family model down to one tensor-parallel rank.

Per decoder layer (Megatron's split, two all-reduces per layer):
  * attention: ``qkv_proj`` keeps this rank's query heads and their KV heads (column-parallel); when
    there are fewer KV heads than ranks, each KV head is replicated on the ranks whose query heads
    read it. ``o_proj`` keeps the matching input columns (row-parallel) and all-reduces its output.
  * MLP: ``gate_up_proj`` keeps this rank's slice of the intermediate size (column-parallel);
    ``down_proj`` keeps the matching columns (row-parallel) and all-reduces.
  * the vocabulary projection keeps rows ``[rank * Vs, (rank + 1) * Vs)`` (zero-padded when the
    vocabulary does not divide); rank 0 gathers the pieces into full logits for sampling.
Embeddings and norms stay replicated. The model's own code is untouched: it reads the new head counts
from the attention modules and calls the replaced Linear modules as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.runtime.distributed.parallel_state import TPContext


class RowParallelLinear(nn.Module):
    """A Linear holding some input columns: partial products are summed over ranks, bias added once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TPContext):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in / tp]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def head_split(num_heads: int, num_kv_heads: int, tp_size: int, rank: int) -> tuple[range, range]:
    """This rank's query heads and KV heads (KV heads replicated when fewer than ranks)."""
    if num_heads % tp_size:
        raise ValueError(f"tp_size {tp_size} must divide num_attention_heads {num_heads}")
    q_per = num_heads // tp_size
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"tp_size {tp_size} must divide num_key_value_heads {num_kv_heads}")
        kv_per = num_kv_heads // tp_size
        return range(rank * q_per, (rank + 1) * q_per), range(rank * kv_per, (rank + 1) * kv_per)
    if tp_size % num_kv_heads:
        raise ValueError(f"num_key_value_heads {num_kv_heads} must divide tp_size {tp_size} to be replicated")
    kv = rank * num_kv_heads // tp_size  # every query head of this rank reads this one KV head
    return range(rank * q_per, (rank + 1) * q_per), range(kv, kv + 1)


def local_kv_heads(config, tp_size: int) -> int:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return len(head_split(heads, kv, tp_size, 0)[1])


def _rows(t: torch.Tensor | None, head_range: range, head_dim: int) -> torch.Tensor | None:
    if t is None:
        return None
    return t[head_range.start * head_dim : head_range.stop * head_dim]


def _shard_attention(attn: nn.Module, tp: TPContext) -> None:
    D, Hq, Hkv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    q_heads, kv_heads = head_split(Hq, Hkv, tp.world_size, tp.rank)
    w, b = attn.qkv_proj.weight, attn.qkv_proj.bias  # [Hq*D + 2*Hkv*D, hidden]
    q_w, k_w, v_w = w.split([Hq * D, Hkv * D, Hkv * D])
    parts_w = [_rows(q_w, q_heads, D), _rows(k_w, kv_heads, D), _rows(v_w, kv_heads, D)]
    new_b = None
    if b is not None:
        q_b, k_b, v_b = b.split([Hq * D, Hkv * D, Hkv * D])
        new_b = torch.cat([_rows(q_b, q_heads, D), _rows(k_b, kv_heads, D), _rows(v_b, kv_heads, D)])
    attn.qkv_proj = _linear(torch.cat(parts_w), new_b)
    o_w = attn.o_proj.weight[:, q_heads.start * D : q_heads.stop * D]  # [hidden, Hq_local*D]
    attn.o_proj = RowParallelLinear(o_w.contiguous(), attn.o_proj.bias, tp)
    attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
    attn.q_size, attn.kv_size = len(q_heads) * D, len(kv_heads) * D


def _shard_mlp(mlp: nn.Module, tp: TPContext) -> None:
    inter = mlp.intermediate_size
    if inter % tp.world_size:
        raise ValueError(f"tp_size {tp.world_size} must divide intermediate_size {inter}")
    per = inter // tp.world_size
    lo, hi = tp.rank * per, (tp.rank + 1) * per
    w, b = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias  # [2I, hidden]: gate rows, then up rows
    new_w = torch.cat([w[lo:hi], w[inter + lo : inter + hi]])
    new_b = None if b is None else torch.cat([b[lo:hi], b[inter + lo : inter + hi]])
    mlp.gate_up_proj = _linear(new_w, new_b)
    mlp.down_proj = RowParallelLinear(mlp.down_proj.weight[:, lo:hi].contiguous(), mlp.down_proj.bias, tp)
    mlp.intermediate_size = per


class TensorParallelLM(nn.Module):
    """The sharded model: ``forward(fb, attn)`` returns full float32 logits [N, V] on rank 0.

    Other ranks return their own vocabulary slice; nothing reads it. ``config`` is the model's.
    """

    def __init__(self, model: nn.Module, tp: TPContext):
        super().__init__()
        self.inner = model
        self.config = model.config
        self.tp = tp
        vocab = model.config.vocab_size
        per = -(-vocab // tp.world_size)
        lo, hi = tp.rank * per, min((tp.rank + 1) * per, vocab)
        w = model.lm_head_weight
        shard = torch.zeros((per, w.shape[1]), dtype=w.dtype, device=w.device)
        if hi > lo:
            shard[: hi - lo] = w[lo:hi]
        self.vocab_shard = nn.Parameter(shard, requires_grad=False)  # [V / tp, hidden]
        self.vocab_size = vocab
        if not model.tie_word_embeddings:
            model.lm_head = None  # the full projection is no longer needed on this rank

    def forward(self, fb, attn) -> torch.Tensor:
        h = self.inner.final_hidden(fb, attn)  # [N, hidden]
        local = F.linear(h, self.vocab_shard).float()  # [N, V / tp]
        if local.shape[0] == 0:  # every rank knows N: a middle prefill chunk needs no logits
            return local.new_empty((0, self.vocab_size))
        full = self.tp.gather_columns(local, self.vocab_size)
        return local if full is None else full  # [N, V] on rank 0


def shard_model(model: nn.Module, tp: TPContext) -> TensorParallelLM:
    """Cut ``model`` (loaded whole, on any device) to rank ``tp.rank``'s share, in place, and wrap it."""
    for layer in model.model.layers:
        _shard_attention(layer.self_attn, tp)
        _shard_mlp(layer.mlp, tp)
    return TensorParallelLM(model, tp)
