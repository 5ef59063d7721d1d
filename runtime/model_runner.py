"""ModelRunner: owns the model, the KV pools, the attention backend and the device sampler; runs one pass.

It sizes the KV pool (``max_total_tokens``, or a fraction of free memory), loads the weights with our
own model code, and turns a ForwardBatch into logits that stay on the model's device (only the rows the
host asks for are copied); its ``DeviceSampler`` turns them into token ids there. It knows nothing of
requests or policies.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from radixlm.runtime.attention import create_attention_backend
from radixlm.runtime.device_sampler import DeviceSampler
from radixlm.runtime.dtypes import dtype_name, resolve_dtype
from radixlm.runtime.forward_batch import ForwardBatch
from radixlm.runtime.memory_pool import KVPool, ReqToTokenPool
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

# A CPU pool sized from 24 GiB of RAM for a tiny model would be absurd; cap what "auto" picks.
_CPU_AUTO_MAX_TOKENS = 1 << 18


@dataclass
class ForwardOutput:
    """One pass's logits: all rows on the model's device (for ``sampler``), the few the host asked for copied."""

    logits: torch.Tensor  # [N, V] float32 on the model's device
    host_logits: torch.Tensor | None  # [len(host_rows), V] float32 on the host, or None


class ModelRunner:
    def __init__(self, args: ServerArgs, tp_rank: int = 0):
        """``tp_rank``: this process's tensor-parallel rank (with ``args.tp_size`` > 1; 0 runs the scheduler)."""
        from radixlm.runtime.models.loader import load_model

        self.args = args
        # Tensor parallelism (runtime/distributed): join the group, shard after load, send each step.
        self.tp = None
        self._steps = None
        if args.tp_size > 1:
            from radixlm.runtime.distributed import TPContext

            self.tp = TPContext.create(args, tp_rank)
        self.device = self.tp.device if self.tp else args.resolved_device
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(args.model_path)
        self.dtype = resolve_dtype(args.dtype, hf_config)
        t0 = time.perf_counter()
        logger.info("loading %s (%s, %s) ...", args.model_path, dtype_name(self.dtype), self.device)
        self.model = load_model(args.model_path, self.dtype, "cpu" if self.tp else self.device)
        self.config = self.model.config
        n_params = sum(p.numel() for p in self.model.parameters())
        n_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info(
            "loaded %s: %.1fM parameters, %.1f MB of %s weights, in %.1f s",
            args.model_path, n_params / 1e6, n_bytes / 1e6, dtype_name(self.dtype), time.perf_counter() - t0,
        )
        if self.tp:
            from radixlm.runtime.distributed.sharding import shard_model

            self.model = shard_model(self.model, self.tp).to(self.device)

        if not self.tp and not args.disable_cpu_packed_linear:
            from radixlm.runtime.models.packed_linear import can_pack, pack_linears

            if can_pack(self.device, self.dtype):
                logger.info("oneDNN prepacked weights for %d linear layers", pack_linears(self.model))
        cfg = self.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if self.tp:  # this rank's KV heads only: the pool is per rank
            from radixlm.runtime.distributed.sharding import local_kv_heads

            self.num_kv_heads = local_kv_heads(cfg, self.tp.world_size)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.context_len = args.context_length or getattr(cfg, "max_position_embeddings", 4096)
        self.max_total_tokens = self._pool_size()
        if self.tp:  # rank 0 allocates slots for every rank: all pools must be as large as the smallest
            self.max_total_tokens = self.tp.agree_min(self.max_total_tokens)
        self.req_to_token_pool = ReqToTokenPool(args.max_running_requests, self.context_len + 1, self.device)
        self.kv_pool = KVPool(
            self.max_total_tokens, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )
        q_heads = cfg.num_attention_heads // (self.tp.world_size if self.tp else 1)
        self.attn_backend = create_attention_backend(
            args.resolved_attention_backend, self.kv_pool, self.req_to_token_pool,
            paged_decode=not args.disable_cpu_paged_decode, paged_extend=not args.disable_cpu_paged_extend,
            num_heads=q_heads,
        )
        self._install_decoder_ops(args, cfg, q_heads)
        self.sampler = DeviceSampler(self.vocab_size, self.device, args.random_seed)
        self.forward_time = 0.0  # seconds spent in forward passes (for overhead accounting)
        if self.tp:  # every rank reaches this point: the port broadcast is a collective
            from radixlm.runtime.distributed.step_channel import StepLeader

            self._steps = StepLeader(self.tp.step_channel_host, self.tp.step_channel_preferred_port) if self.tp.is_leader else None
            port = self.tp.broadcast_int(self._steps.port if self._steps else 0)
            self.step_channel_addr = f"tcp://{self.tp.step_channel_host}:{port}"
            if self._steps:
                self._steps.wait_for_followers(self.tp.world_size - 1)


    def _install_decoder_ops(self, args: ServerArgs, cfg, q_heads: int) -> None:
        """The elementwise ops: native CPU loops (unless disabled or unavailable) or eager torch, and with
        --enable-torch-compile inductor's fused versions for prefill-sized calls, compiled now."""
        from radixlm.runtime.models import cpu_decoder_ops, decoder_ops

        small = decoder_ops.EAGER
        if torch.device(self.device).type == "cpu" and not args.disable_cpu_decoder_ops:
            small = cpu_decoder_ops.load() or small
        if not args.enable_torch_compile:
            decoder_ops.install(self.model, small)
            return
        t0 = time.perf_counter()
        ops = decoder_ops.compiled_ops(small=small)
        decoder_ops.install(self.model, ops)
        with torch.inference_mode():  # as forward runs: dynamo guards on the grad mode
            decoder_ops.warm_up(ops, self.model, cfg, q_heads, self.num_kv_heads, self.dtype, self.device)
        logger.info("torch.compile: elementwise ops ready in %.1f s", time.perf_counter() - t0)
    def _pool_size(self) -> int:
        if self.args.max_total_tokens is not None:
            return self.args.max_total_tokens
        bytes_per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        if self.device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info()
            return max(int(free * self.args.mem_fraction_static) // bytes_per_token, 1)
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(min(int(avail * self.args.mem_fraction_static) // bytes_per_token, _CPU_AUTO_MAX_TOKENS), 1)

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, host_rows: list[int] | None = None) -> ForwardOutput:
        """Run the pass over ``fb`` (logits rows ``fb.logits_indices``); copy only ``host_rows`` to the host.

        The logits stay on the device: ``self.sampler`` (a ``DeviceSampler``) turns them into token ids
        there, so no [rows, vocab] tensor crosses to the host except ``host_rows`` (prompt logprobs,
        jump-forward verification) and the logprob rows of requests that asked for logprobs.
        """
        logits = self.forward_logits(fb)  # [N, V]
        host = None
        if host_rows:
            host = logits.index_select(0, torch.tensor(host_rows, dtype=torch.int64, device=logits.device)).cpu()
        return ForwardOutput(logits, host)

    @torch.inference_mode()
    def forward_logits(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits [N, V] float32, on the model's device, for the rows ``fb.logits_indices``."""
        t0 = time.perf_counter()
        if self._steps is not None:  # every rank runs the same forward pass
            self._steps.send_step(fb, self.req_to_token_pool.req_to_token)
        self.attn_backend.init_forward_metadata(fb)
        logits = self.model(fb, self.attn_backend).float()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.forward_time += time.perf_counter() - t0
        return logits

    def close(self) -> None:
        """Release the other tensor-parallel ranks and leave the process group (no-op without TP)."""
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self.tp is not None:
            self.tp.close()
            self.tp = None
