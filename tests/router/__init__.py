"""Tests of router/ (radixlm.router)."""
