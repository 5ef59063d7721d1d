"""Tests of runtime/kv_tiers/."""
