"""Model zoo: our own implementations of Hugging Face architectures over the paged KV cache.

``MODEL_REGISTRY`` maps a config's ``architectures`` entry to the class; ``loader.load_model`` is the
entry point the ModelRunner uses.
"""

from __future__ import annotations

from radixlm.runtime.models.llama import LlamaForCausalLM

# Llama, Mistral and Qwen2 share one implementation; per-arch switches are read from the config.
MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM"]
