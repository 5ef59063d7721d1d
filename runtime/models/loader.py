"""Load a Hugging Face checkpoint directory into our own model classes.

Reads config.json with ``transformers.AutoConfig``, builds the model on the meta device (no throw-away
random init), then streams tensors out of ``model.safetensors`` or the shards listed in
``model.safetensors.index.json`` straight into the parameters, converting dtype on the way. Every
parameter must be covered exactly once; a missing, unknown or mis-shaped tensor is a ValueError.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from tqdm import tqdm

from radixlm.runtime.dtypes import resolve_dtype
from radixlm.runtime.models import MODEL_REGISTRY
from radixlm.runtime.models.rope import RotaryEmbedding

# Tensors some checkpoints carry that are derived, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_class(config) -> type[nn.Module]:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"architectures {archs} not supported; supported: {sorted(MODEL_REGISTRY)}")


def checkpoint_files(model_path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded or not)."""
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_path, s) for s in shards]
    single = os.path.join(model_path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ValueError(f"model_path {model_path!r} has no model.safetensors or model.safetensors.index.json")


def load_weights(model: nn.Module, files: list[str]) -> None:
    """Copy every checkpoint tensor into ``model``'s parameters, fusing q/k/v and gate/up rows."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    tied = getattr(model, "tie_word_embeddings", False)
    stacked = getattr(model, "stacked_params", ())
    loaded: set[tuple[str, int | None]] = set()
    # A bar only where it tells something: one step per shard of a sharded checkpoint. (Not even a
    # disabled one otherwise: tqdm creates a multiprocessing lock that a terminated server then leaks.)
    shards = tqdm(files, desc="loading weight shards", unit="shard") if len(files) > 1 else files
    for path in shards:
        with safe_open(path, framework="pt", device="cpu") as sf:
            for name in sf.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                target, shard = name, None
                for ckpt_frag, fused_frag, idx in stacked:
                    if ckpt_frag in name:
                        target, shard = name.replace(ckpt_frag, fused_frag), idx
                        break
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
                dest = params[target].data
                if shard is not None:
                    sizes = model.shard_sizes(target)
                    dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
                tensor = sf.get_tensor(name)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(dest.shape)}")
                dest.copy_(tensor)
                loaded.add((target, shard))
    expected: set[tuple[str, int | None]] = set()
    for pname in params:
        if any(fused in pname for _, fused, _ in stacked):
            expected |= {(pname, i) for i in range(len(model.shard_sizes(pname)))}
        else:
            expected.add((pname, None))
    missing = sorted(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing tensors for: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def load_model(model_path: str, dtype: torch.dtype | str = "auto", device: torch.device | str = "cpu") -> nn.Module:
    """Our implementation of the checkpoint's architecture, weights loaded, in eval mode.

    ``model.config`` is the transformers config; ``model(fb, attn)`` returns float32 logits [N, V].
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    cls = resolve_model_class(config)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = cls(config, device="meta")
    model = model.to(dtype=torch_dtype).to_empty(device=device)
    # to()/to_empty() wiped the float32 rope frequencies: rebuild them on the target device.
    model.model.rotary_emb = RotaryEmbedding(config, device)
    load_weights(model, checkpoint_files(model_path))
    return model.eval().requires_grad_(False)
