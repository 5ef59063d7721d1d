"""radixlm: structured generation with RadixAttention (SGLang-compatible frontend)."""

__version__ = "0.1.0"
