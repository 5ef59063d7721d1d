"""ServerArgs: every engine and server setting, one frozen dataclass passed down.

Flag names follow SGLang's where SGLang has one, so ``--mem-fraction-static`` and friends work as a
SGLang user types them. ``Engine(**kwargs)``, ``radixlm serve`` and ``radixlm.Runtime`` all build
one of these; nothing reads settings from globals.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

SCHEDULE_POLICIES = ("lpm", "dfs-weight", "fcfs", "lof", "random")


@dataclass(frozen=True)
class ServerArgs:
    model_path: str
    tokenizer_path: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    context_length: Optional[int] = None
    # Memory
    max_total_tokens: Optional[int] = None  # KV pool size in tokens; overrides mem_fraction_static
    mem_fraction_static: float = 0.5  # fraction of free device memory for the KV pool
    max_running_requests: int = 256
    # Scheduling
    schedule_policy: str = "lpm"
    chunked_prefill_size: int = 2048  # <= 0 disables chunking
    max_prefill_tokens: int = 16384
    disable_radix_cache: bool = False
    lpm_aging_steps: int = 32  # a waiting request is admitted within this many scheduling steps
    lpm_fallback_queue_len: int = 128  # above this queue length LPM falls back to FCFS
    in_batch_prefix_threshold: int = 32  # defer a request whose uncached prefix another one in the batch computes
    new_token_ratio: float = 0.4  # decode reservation per running request, fraction of its remaining budget
    debug_check_memory: bool = False  # assert the KV invariant whenever the scheduler is idle
    random_seed: int = 0
    # Kernels and decoding
    attention_backend: str = "auto"  # auto | torch | triton
    enable_jump_forward: bool = True
    grammar_cache_size: int = 64
    # JSON whitespace between tokens: None = outlines' default (optional single space), "" = compact JSON
    constrained_json_whitespace_pattern: Optional[str] = None
    # Server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: Optional[str] = None
    chat_template: Optional[str] = None
    served_model_name: Optional[str] = None
    log_level: str = "info"
    log_interval_s: float = 10.0
    max_request_body_bytes: int = 32 * 1024 * 1024  # HTTP body / ZeroMQ message limit (413 above it)

    def __post_init__(self) -> None:
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype: unsupported {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError("max_total_tokens must be >= 1")
        if not (0.0 < self.mem_fraction_static < 1.0):
            raise ValueError("mem_fraction_static must be in (0, 1)")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.max_request_body_bytes < 1:
            raise ValueError("max_request_body_bytes must be >= 1")

    # ------------------------------------------------------------------ derived
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
            if f.type in ("bool",) or isinstance(default, bool):
                parser.add_argument(flag, action="store_true", default=default)
                if default:
                    parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false")
                continue
            typ = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
            kw: dict[str, Any] = {"type": typ, "default": default, "dest": f.name}
            if f.name == "schedule_policy":
                kw["choices"] = SCHEDULE_POLICIES
            if f.name == "model_path":
                kw["required"] = True
                del kw["default"]
            parser.add_argument(flag, **kw)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
