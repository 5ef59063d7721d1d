"""Tests of kernels/ (radixlm.kernels)."""
