"""Linear layers with their weights prepacked for oneDNN: the CPU's fast path at serving batch sizes.

torch's ``F.linear`` on the CPU calls MKL's sgemm on the row-major weight and repacks it into the
kernel's blocked layout on every call, which at small batch sizes costs as much as the product itself.
oneDNN can take the weight reordered once, at load, into its own blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``) and then read it as it is
(``torch.ops.mkldnn._linear_pointwise``). Measured on the llama ``small`` shapes, 2 threads, the four
layer linears plus the vocabulary projection per call, weights hot in cache, quiet machine:

    rows (tokens)        1      4      16     64     200    2048
    float32  packed    0.91   0.94   1.83   5.13   14.1   150    ms
    float32  F.linear  0.65   1.33   3.97   6.21   16.9   154
    bfloat16 packed    0.73   0.66   0.66   1.52   5.5    38.4
    bfloat16 F.linear  1.22   0.95   1.11   2.21   6.8    34.6

So every batch of 2 to a few hundred rows is 1.2-2.2x faster; a single decoding request in float32 pays
about 0.25 ms per layer set more, and a 2k-token prefill is within a few percent either way. In the
model, where the weights come from DRAM rather than cache, the gain is smaller: a 16-request decode
step's linears went from 17.3 to 13.9 ms (docs/benchmarks.md, the levers table). Only the
packed copy is kept (the row-major weight is dropped), so weight memory does not grow. The results agree
with ``F.linear`` to rounding (a different summation order); tests compare tokens and logprobs with
transformers on the default path, which is this one on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN is told to expect when it chooses the blocked layout (any row count works).
_PACK_ROWS_HINT = 1024


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with W held in oneDNN's blocked layout (CPU, float32 or bfloat16)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] → [T, out]."""
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(device: str, dtype: torch.dtype) -> bool:
    """Packed linears need the CPU, a oneDNN build of torch, and float32 or bfloat16 weights."""
    return (str(device) == "cpu" and torch.backends.mkldnn.is_available()
            and dtype in (torch.float32, torch.bfloat16))


def pack_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` in ``model`` by a ``PackedLinear``, in place; returns how many."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    with torch.no_grad():
        for parent, name, child in targets:
            setattr(parent, name, PackedLinear(child))
    return len(targets)
