"""The attention backend interface.

One interface, several implementations (``torch``: the CPU default and the reference; ``triton``:
the CUDA default, calling radixlm.kernels). All implementations read the same metadata from the
ForwardBatch and the same paged KV pool, so they are interchangeable under the Engine.

Contract for ``forward``:
  * q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D] are the new tokens of the step, request-major.
  * The backend first writes k, v into the pool at ``fb.out_cache_loc`` for ``layer_id``.
  * Token i of request b attends to that request's KV slots ``req_to_token[req_pool_indices[b],
    : prefix_lens[b] + j + 1]`` where j is i's index among b's new tokens (causal within the step,
    full over the cached prefix).
  * Returns o [T, Hq, D] in q's dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from radixlm.runtime.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    """Reads and writes the paged KV pool for one model's layers."""

    @abstractmethod
    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        """Compute per-step metadata once (index tensors, masks) and store it in ``fb.attn_metadata``.

        Called once per forward pass, before layer 0; every layer reuses it.
        """

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_id: int,
        fb: ForwardBatch,
        sm_scale: float,
    ) -> torch.Tensor:
        """Store k/v of the new tokens, then attend. See the module docstring for shapes."""
