"""The dtype names radixlm accepts — one table for ``--dtype`` / ``ServerArgs.dtype``, the ModelRunner
and ``models.loader.load_model``.

``DTYPE_CHOICES`` is plain strings so that ``server_args`` can list them without importing torch;
the torch dtypes are looked up only when a model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Accepted name → the torch dtype's attribute name (SGLang's and vLLM's spellings both work).
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPE_ALIASES)


def torch_dtype(name: str) -> "torch.dtype":
    """An accepted name → its torch dtype; ValueError naming ``dtype`` otherwise."""
    import torch

    if name not in DTYPE_ALIASES:
        raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {name!r}")
    return getattr(torch, DTYPE_ALIASES[name])


def resolve_dtype(dtype: "torch.dtype | str | None", config: Any) -> "torch.dtype":
    """A torch dtype, an accepted name, or ``"auto"``/None: the checkpoint's own (``config.dtype`` or
    ``config.torch_dtype``), float32 when the config names none this table knows."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        return torch_dtype(str(dtype))
    cfg = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg, torch.dtype):
        return cfg
    return torch_dtype(str(cfg)) if str(cfg) in DTYPE_ALIASES else torch.float32


def dtype_name(dtype: "torch.dtype") -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (for logs and model info)."""
    return str(dtype).replace("torch.", "")
