"""Tests of lang/ (the DSL, radixlm)."""
