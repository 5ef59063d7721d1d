"""Tests of runtime/ (radixlm.runtime)."""
