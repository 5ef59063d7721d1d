"""Tests of benchmarks/ (the runners' own logic)."""
