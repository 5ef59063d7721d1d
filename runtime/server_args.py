"""ServerArgs: every engine and server setting, one frozen dataclass passed down.

Flag names follow SGLang's where SGLang has one, so ``--mem-fraction-static`` and friends work as a
SGLang user types them. ``Engine(**kwargs)``, ``radixlm serve`` and ``radixlm.Runtime`` all build
one of these; nothing reads settings from globals.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from radixlm.runtime.dtypes import DTYPE_CHOICES

SCHEDULE_POLICIES = ("lpm", "dfs-weight", "fcfs", "lof", "random")
HICACHE_WRITE_POLICIES = ("write_through", "write_through_selective", "write_back")
HICACHE_COMPRESSION = ("auto", "none", "int8", "fp8")
HICACHE_STORAGE_BACKENDS = (None, "file")
GRAMMAR_BACKENDS = ("auto", "outlines", "xgrammar")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DP_POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")  # = radixlm.router.policy.POLICIES
# Kept in step with runtime/parsers (a test checks): listed here so ServerArgs imports nothing heavy.
TOOL_CALL_PARSERS = ("auto", "hermes", "qwen25", "qwen", "llama3", "mistral")
REASONING_PARSERS = ("none", "deepseek-r1", "qwen3")


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` → (host, port); a ValueError naming dist_init_addr otherwise."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ValueError(f"dist_init_addr must be 'host:port', got {addr!r}")
    return host.strip("[]"), int(port)


def arg(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    """A ServerArgs field: its default, its ``--help`` text and (optionally) its allowed values.

    The help text and choices live here, next to the field, and nowhere else: ``add_cli_args`` turns
    them into argparse options and ``__post_init__`` checks the choices for the Engine and Runtime too.
    """
    meta = {"help": help, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerArgs:
    model_path: str = arg(None, "a local Hugging Face model directory (config.json, safetensors, tokenizer)")
    tokenizer_path: Optional[str] = arg(None, "tokenizer directory, when it is not the model's")
    dtype: str = arg("auto", "weights and KV dtype; auto takes the checkpoint's", DTYPE_CHOICES)
    device: str = arg("auto", "where the model runs; auto picks cuda when available", ("auto", "cpu", "cuda"))
    context_length: Optional[int] = arg(None, "maximum tokens per request (prompt + output); default: the model's")
    # Memory
    max_total_tokens: Optional[int] = arg(None, "KV pool size in tokens; overrides --mem-fraction-static")
    mem_fraction_static: float = arg(0.5, "fraction of free device memory given to the KV pool")
    max_running_requests: int = arg(256, "requests decoding at once (rows of the request-to-token table)")
    # Scheduling
    schedule_policy: str = arg("lpm", "queue order: longest prefix match, DFS weight, FCFS, ...", SCHEDULE_POLICIES)
    chunked_prefill_size: int = arg(2048, "prompt tokens per request per step; longer prompts are chunked (<= 0: off)")
    max_prefill_tokens: int = arg(16384, "prompt tokens computed per scheduler step, over all requests")
    disable_radix_cache: bool = arg(False, "turn prefix caching off (the no-cache baseline)")
    lpm_aging_steps: int = arg(32, "a waiting request goes to the front after this many scheduler steps")
    enable_priority_scheduling: bool = arg(
        False, "admit waiting requests by their priority field first (higher values first), then by the policy; "
        "aged requests still go first")
    schedule_low_priority_values_first: bool = arg(
        False, "with --enable-priority-scheduling, lower priority values are admitted first")
    default_priority_value: Optional[int] = arg(
        None, "with --enable-priority-scheduling, the priority of a request that gives none (none: after all others)")
    abort_on_priority_when_disabled: bool = arg(
        False, "without --enable-priority-scheduling, refuse (400) a request that gives a priority instead of ignoring it")
    lpm_fallback_queue_len: int = arg(128, "above this many waiting requests lpm/dfs-weight fall back to fcfs")
    in_batch_prefix_threshold: int = arg(
        32, "defer a request for one step when a request admitted now computes this many of its uncached tokens"
    )
    new_token_ratio: float = arg(0.4, "KV reserved per running request, as a fraction of its remaining token budget")
    # KV tiers behind the radix tree (SGLang's HiCache names; see runtime/kv_tiers/)
    enable_hierarchical_cache: bool = arg(False, "keep KV evicted from the device pool in a host tier (and on disk)")
    hicache_ratio: float = arg(2.0, "host tier size as a multiple of the device KV pool's bytes")
    hicache_size: float = arg(0, "host tier size in GB; overrides --hicache-ratio when > 0")
    hicache_write_policy: str = arg(
        "write_through", "when device KV is copied to the host tier", HICACHE_WRITE_POLICIES
    )
    hicache_compression: str = arg(
        "auto", "host/disk tier KV codec: none (lossless), int8 or fp8 with per-block scales; auto: int8 on "
        "the CPU, none on CUDA", HICACHE_COMPRESSION
    )
    hicache_storage_backend: Optional[str] = arg(
        None, "persistent KV tier: file (a local directory, --hicache-storage-dir)", HICACHE_STORAGE_BACKENDS
    )
    hicache_storage_dir: Optional[str] = arg(None, "directory of the persistent KV tier (implies the file backend)")
    hicache_storage_size_gb: float = arg(16.0, "bound on the persistent KV tier's directory, in GB (LRU eviction)")
    hicache_storage_block_size: int = arg(64, "tokens per block of the persistent KV tier")
    debug_check_memory: bool = arg(False, "assert the KV memory invariant whenever the scheduler is idle")
    random_seed: int = arg(0, "seed for requests that give none")
    # Kernels and decoding
    attention_backend: str = arg(
        "auto", "attention implementation; auto: triton on CUDA, torch on the CPU", ("auto", "torch", "triton")
    )
    enable_torch_compile: bool = arg(
        False, "torch.compile the decoder's elementwise ops (RMSNorm, RoPE, SiLU-and-multiply, each fused into "
        "one loop) for calls of 256 rows or more (prefill; decode batches stay eager, faster there); the "
        "first start compiles for about a minute, later ones hit inductor's cache"
    )
    disable_cpu_paged_decode: bool = arg(
        False, "on the CPU, decode attention gathers each request's context and runs torch's flash kernel "
        "instead of the native paged decode kernel that reads the KV pool in place (built on first use with "
        "the C++ compiler; see runtime/attention/cpu_paged_decode.py)"
    )
    disable_cpu_paged_extend: bool = arg(
        False, "on the CPU, extend (prefill) attention runs torch's flash kernel per request or padded group "
        "instead of the native paged extend kernel (AVX-512; built on first use with the C++ compiler; see "
        "runtime/attention/cpu_paged_extend.py)"
    )
    disable_cpu_decoder_ops: bool = arg(
        False, "on the CPU, run RMSNorm, RoPE and SiLU-and-multiply as torch's eager ops instead of one native "
        "loop each (float32, bfloat16; built on first use with the C++ compiler; see runtime/models/cpu_decoder_ops.py)"
    )
    disable_cpu_packed_linear: bool = arg(
        False, "on the CPU, keep the linear layers on F.linear (MKL) instead of oneDNN with weights prepacked "
        "at load (1.2-2x faster at batch sizes 2-200; see runtime/models/packed_linear.py)"
    )
    enable_jump_forward: bool = arg(True, "append text a grammar forces without sampling it")
    grammar_cache_size: int = arg(64, "compiled grammars kept (LRU)")
    grammar_compile_timeout: float = arg(
        10.0, "seconds one grammar build may take in its worker process; longer: the request fails (400)"
    )
    grammar_max_memory_mb: int = arg(2048, "address-space limit of the grammar compile worker process, in MB")
    grammar_backend: str = arg(
        "auto", "grammar engine: outlines (regex, JSON schema), xgrammar (also ebnf, structural_tag), "
        "or auto (outlines where it can, xgrammar for the rest)", GRAMMAR_BACKENDS)
    constrained_json_whitespace_pattern: Optional[str] = arg(
        None, "regex for whitespace between JSON tokens; default: outlines' (an optional space); '' = compact"
    )
    # Parallelism (runtime/distributed; SGLang's flag names)
    tp_size: int = arg(1, "tensor-parallel ranks: attention heads and the MLP are sharded over them")
    dp_size: int = arg(1, "data-parallel replicas behind one front door, routed cache-aware (serve only)")
    load_balance_method: str = arg(
        "cache_aware", "how --dp-size routes requests to its replicas (the router's policies)", DP_POLICIES
    )
    nnodes: int = arg(1, "machines the tensor-parallel ranks span (tp_size is split evenly over them)")
    node_rank: int = arg(0, "this machine's index among --nnodes; node 0 runs the scheduler and HTTP")
    dist_init_addr: Optional[str] = arg(
        None, "host:port of node 0 for the process-group rendezvous (port+1: the step channel); "
        "default on one node: a free loopback port"
    )
    base_gpu_id: int = arg(0, "first GPU of this node's ranks (rank r on this node uses base + r)")
    # Server
    host: str = arg("127.0.0.1", "address to listen on (HTTP and the ZeroMQ front door)")
    port: int = arg(30000, "HTTP port")
    api_key: Optional[str] = arg(None, "require 'Authorization: Bearer KEY' on every route but /health")
    chat_template: Optional[str] = arg(None, "a chat template name or Jinja file; default: the tokenizer's")
    served_model_name: Optional[str] = arg(
        None, "the model id of the OpenAI routes (/v1/models, the 'model' field); default: the model "
        "directory's name"
    )
    tool_call_parser: str = arg(
        "auto", "tool-call format of the model's outputs; auto: detected from the chat template", TOOL_CALL_PARSERS
    )
    reasoning_parser: str = arg(
        "none", "split <think> reasoning into reasoning_content (DeepSeek-R1, Qwen3); none: off", REASONING_PARSERS
    )
    log_level: str = arg("info", "logging level of the server processes", LOG_LEVELS)
    incremental_streaming_output: bool = arg(
        False, "native /generate streams send each chunk's new text, ids and logprobs (SGLang's flag) "
        "instead of everything so far")
    stream_interval: int = arg(1, "streaming: send a chunk every this many tokens (a request may set its own)")
    log_interval_s: float = arg(10.0, "seconds between the scheduler's throughput log lines")
    max_request_body_bytes: int = arg(32 * 1024 * 1024, "largest HTTP body or ZeroMQ message (413 above it)")
    # Liveness (docs/reliability.md)
    health_stall_timeout: float = arg(
        30.0, "/health fails once the scheduler has sent no heartbeat (made no progress) for this many seconds"
    )
    request_timeout: Optional[float] = arg(
        None, "seconds a request may take from arrival to its last output; over it: aborted, 504 (default: none)"
    )
    # Admission limits (runtime/validation.py): a request over one is a 400 naming the field
    max_n: int = arg(128, "largest n (samples per prompt) one request may ask for")
    max_prompts_per_request: int = arg(1024, "most prompts in one batch request, and most sequences (prompts x n)")
    max_prompt_tokens: int = arg(0, "most prompt tokens per sequence; 0: the context length")
    max_tokens_default_cap: int = arg(
        4096, "max_tokens of an OpenAI request that gives none: the rest of the context, at most this"
    )

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("model_path is required")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError("max_total_tokens must be >= 1")
        if not (0.0 < self.mem_fraction_static < 1.0):
            raise ValueError("mem_fraction_static must be in (0, 1)")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.enable_hierarchical_cache and self.disable_radix_cache:
            raise ValueError("enable_hierarchical_cache needs the radix cache (drop disable_radix_cache)")
        if self.hicache_ratio <= 0:
            raise ValueError("hicache_ratio must be > 0")
        if self.hicache_size < 0:
            raise ValueError("hicache_size must be >= 0")
        if self.hicache_storage_backend == "file" and not self.hicache_storage_dir:
            raise ValueError("hicache_storage_dir is required with hicache_storage_backend='file'")
        if self.enable_hierarchical_cache and self.tp_size > 1:
            # Each rank holds its own shard of the KV; the tiers move rank 0's pool only.
            raise ValueError("enable_hierarchical_cache: the KV tiers support tp_size 1 only (got tp_size "
                             f"{self.tp_size}); use --dp-size replicas, which may share --hicache-storage-dir")
        if self.hicache_storage_dir and not self.enable_hierarchical_cache:
            raise ValueError("hicache_storage_dir needs enable_hierarchical_cache (the disk tier sits behind the host tier)")
        if self.hicache_storage_size_gb <= 0:
            raise ValueError("hicache_storage_size_gb must be > 0")
        if self.hicache_storage_block_size < 1:
            raise ValueError("hicache_storage_block_size must be >= 1")
        if self.max_request_body_bytes < 1:
            raise ValueError("max_request_body_bytes must be >= 1")
        for name in ("max_n", "max_prompts_per_request", "max_tokens_default_cap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.health_stall_timeout <= 0:
            raise ValueError("health_stall_timeout must be > 0")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0 (or unset)")
        if self.grammar_compile_timeout <= 0:
            raise ValueError("grammar_compile_timeout must be > 0")
        if self.grammar_max_memory_mb < 256:
            raise ValueError("grammar_max_memory_mb must be >= 256 (the worker's interpreter needs some)")
        if self.max_prompt_tokens < 0:
            raise ValueError("max_prompt_tokens must be >= 0 (0: the context length)")
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        if self.nnodes < 1 or self.tp_size % self.nnodes:
            raise ValueError(f"nnodes must be >= 1 and divide tp_size ({self.tp_size}), got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got {self.node_rank}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("dist_init_addr (host:port of node 0) is required when nnodes > 1")
        if self.nnodes > 1 and self.dp_size > 1:
            raise ValueError("dp_size > 1 with nnodes > 1 is not supported: run a router over one server per node")
        if self.dist_init_addr is not None:
            split_addr(self.dist_init_addr)
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        if self.base_gpu_id < 0:
            raise ValueError("base_gpu_id must be >= 0")

    # ------------------------------------------------------------------ derived
    @property
    def model_id(self) -> str:
        """The served model's id: ``served_model_name``, else the model directory's name (no path)."""
        return self.served_model_name or os.path.basename(os.path.normpath(self.model_path)) or self.model_path

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_attention_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.resolved_device.startswith("cuda") else "torch"

    def replace(self, **changes: Any) -> "ServerArgs":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in kwargs if k not in names)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {unknown}")
        return cls(**kwargs)

    # ------------------------------------------------------------------ CLI
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(ServerArgs):
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            help_text = f.metadata["help"]
            if f.type in ("bool",) or isinstance(default, bool):
                if default:
                    parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=True, help=help_text)
                else:
                    parser.add_argument(flag, action="store_true", default=False, help=help_text)
                continue
            typ = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
            kw: dict[str, Any] = {"type": typ, "default": default, "dest": f.name, "help": help_text + " (default: %(default)s)"}
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            if f.name == "model_path":
                kw["required"] = True
                kw["help"] = help_text
                del kw["default"]
            parser.add_argument(flag, **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
