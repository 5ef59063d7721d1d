"""KV codecs: how a tier stores K/V, lossless or quantized with per-block scales.

A codec turns KV rows ``[..., D]`` (one row = one token's K or V for one layer and head) into stored
``data`` plus optional ``scale`` and back. Quantized codecs give every block of ``D`` values (one row)
its own float32 scale (absmax / the format's largest value), so an outlier in one head or token never
costs the others their precision.

  * ``none``: the pool's dtype, bit-exact (the lossless setting).
  * ``int8``: symmetric int8, scale = absmax / 127.
  * ``fp8``: float8 e4m3, scale = absmax / 448.

``bytes_per_row`` is what one row costs in a tier, which is what sizes a tier in tokens for its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODECS = ("none", "int8", "fp8")


@dataclass(frozen=True)
class KVCodec:
    name: str  # one of CODECS
    pool_dtype: torch.dtype  # the device pool's dtype (what decode returns)

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"hicache_compression: unknown codec {self.name!r}; choose from {list(CODECS)}")

    @property
    def lossless(self) -> bool:
        return self.name == "none"

    @property
    def storage_dtype(self) -> torch.dtype:
        return {"none": self.pool_dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[self.name]

    def bytes_per_row(self, head_dim: int) -> int:
        item = torch.empty(0, dtype=self.storage_dtype).element_size()
        return head_dim * item + (0 if self.lossless else 4)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [..., D] in the pool dtype → (data [..., D] storage dtype, scale [...] float32 or None)."""
        if self.lossless:
            return x, None
        xf = x.float()
        amax = xf.abs().amax(dim=-1)  # [...]
        top = 127.0 if self.name == "int8" else 448.0
        # A zero row keeps scale 1 so decode gives exact zeros (and no division by zero).
        scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
        q = xf / scale.unsqueeze(-1)
        if self.name == "int8":
            data = q.round_().clamp_(-127, 127).to(torch.int8)
        else:
            data = q.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn)
        return data, scale

    def decode(self, data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Inverse of ``encode`` (exact for ``none``), in the pool dtype."""
        if self.lossless:
            return data.to(self.pool_dtype)
        return (data.float() * scale.unsqueeze(-1)).to(self.pool_dtype)
