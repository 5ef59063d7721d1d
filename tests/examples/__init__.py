"""Tests that run examples/."""
