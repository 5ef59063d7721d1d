"""The Hugging Face tokenizer: loading it from a model directory, and every id that ends generation."""

from __future__ import annotations

import json
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model_path: str) -> set[int]:
    """EOS ids from the tokenizer and generation_config.json (which may list several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = os.path.join(model_path, "generation_config.json")
    if os.path.exists(gen_cfg):
        with open(gen_cfg) as f:
            eos = json.load(f).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
    return ids
