"""Shared benchmark helpers: model directories, deterministic prompts, transformers baselines.

Every benchmark compares systems side by side in one run on the same prompts and reports ratios,
because the machines here are noisy.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import torch

from radixlm.runtime.tiny_model import make_tiny_model

BENCH_MODEL_DIR = os.environ.get("RADIXLM_BENCH_MODELS", os.path.join(os.path.dirname(__file__), "..", "models"))


def model_dir(arch: str = "llama", preset: str = "small") -> str:
    path = os.path.abspath(os.path.join(BENCH_MODEL_DIR, f"{arch}-{preset}"))
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny_model(path, arch=arch, preset=preset, seed=0)
    return path


def random_prompts(tokenizer, n: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of uniform random length, special tokens excluded."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + [rng.choice(vocab) for _ in range(rng.randint(min_len, max_len) - len(bos))] for _ in range(n)]


@dataclass
class RunResult:
    name: str
    wall_s: float
    prompt_tokens: int
    new_tokens: int
    extra: dict

    @property
    def tok_per_s(self) -> float:
        return self.new_tokens / self.wall_s


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, batch_size: int = 64) -> RunResult:
    """transformers `generate` on left-padded batches (the classic static-batch baseline)."""
    t0 = time.perf_counter()
    new = 0
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, pad_token_id=pad_id,
        )
        new += (out.shape[1] - width) * len(chunk)
    return RunResult("transformers generate", time.perf_counter() - t0, sum(map(len, prompts)), new, {})


def hf_generate_batch(model, prompts: list[list[int]], max_new_tokens: int) -> RunResult:
    """transformers `generate_batch` (its own continuous batching)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=cfg, progress_bar=False)
    wall = time.perf_counter() - t0
    new = sum(len(o.generated_tokens) for o in out.values())
    return RunResult("transformers generate_batch", wall, sum(map(len, prompts)), new, {})


def markdown_table(rows: list[RunResult], baseline: str, extra_cols: tuple[str, ...] = ()) -> str:
    base = next(r for r in rows if r.name == baseline)
    head = "| system | wall s | new tok/s | vs " + baseline + " |" + "".join(f" {c} |" for c in extra_cols)
    sep = "|---|---:|---:|---:|" + "---:|" * len(extra_cols)
    lines = [head, sep]
    for r in rows:
        cells = "".join(f" {r.extra.get(c, '')} |" for c in extra_cols)
        lines.append(f"| {r.name} | {r.wall_s:.2f} | {r.tok_per_s:.1f} | {r.tok_per_s / base.tok_per_s:.2f}x |{cells}")
    return "\n".join(lines)
