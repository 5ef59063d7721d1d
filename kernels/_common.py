"""Argument checks and device facts shared by the kernel launchers.

Checks look only at shapes, dtypes and devices (host metadata): reading index *values* would force
a device sync on every launch, so values are the caller's contract.
"""

from __future__ import annotations

import functools

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
# The largest head dim the kernels tile in one block (registers/shared memory bound the rest).
MAX_HEAD_DIM = 256


def check_tensor(
    name: str,
    t: object,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ValueError naming ``name`` unless ``t`` is a tensor of ``ndim`` dims, an allowed dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of q)")
    return t


def check_indptr(name: str, t: object, batch: int | None, device: torch.device) -> int:
    """Check an indptr tensor ``[B + 1]``; returns B. ``batch`` pins B when already known."""
    check_tensor(name, t, 1, INDEX_DTYPES, device)
    assert isinstance(t, torch.Tensor)
    if t.shape[0] < 1:
        raise ValueError(f"{name} must have B + 1 >= 1 entries, got shape {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch + 1:
        raise ValueError(f"{name} must have shape [{batch + 1}] (B + 1), got {tuple(t.shape)}")
    return t.shape[0] - 1


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take the strides of the leading dims but read the head dim as one contiguous run."""
    return t if t.stride(-1) == 1 else t.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def head_block(head_dim: int) -> int:
    """Padded head dim: a power of two and at least 16, the smallest K dimension tl.dot accepts."""
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    return max(16, next_pow2(head_dim))


def check_runnable(kernel: object, device: torch.device) -> None:
    """CPU tensors run only in Triton's interpreter, which must be chosen before triton is imported."""
    if device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            f"radixlm.kernels got {device} tensors but Triton is not in interpreter mode: set "
            "TRITON_INTERPRET=1 before triton is first imported, or use CUDA tensors"
        )


def dot_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether tiles must be cast to float32 before tl.dot.

    Triton 3.9's interpreter stores bfloat16 as uint16 and its tl.dot multiplies those raw integers
    (garbage results), so off-CUDA bf16 tiles are upcast first. On CUDA bf16 goes to the tensor cores.
    """
    return dtype == torch.bfloat16 and device.type != "cuda"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_parallelism(device: torch.device) -> int:
    """Streaming multiprocessors on CUDA; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def check_sm_scale(sm_scale: float) -> None:
    if not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be a finite number, got {sm_scale!r}")


def output_like(q: torch.Tensor, out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The launcher's output buffer: ``out`` after checks, or a new tensor shaped like q."""
    if out is None:
        return torch.empty_like(q)
    check_tensor("out", out, 3, (q.dtype,), device)
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must have shape {tuple(q.shape)} with a contiguous last dim")
    return out
