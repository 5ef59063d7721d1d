"""Tensor parallelism over ``torch.distributed``: process group, module surgery, and the step channel.

The model code stays single-device (``runtime/models``); a tensor-parallel rank loads the whole
checkpoint, then ``sharding.shard_model`` cuts its attention heads, MLP and vocabulary projection
to this rank's share (as gpt-fast does). Rank 0's ModelRunner sends every forward pass to the other
ranks over the step channel; every rank runs the same forward; logits are gathered on rank 0.
"""

from radixlm.runtime.distributed.parallel_state import TPContext

__all__ = ["TPContext"]
