"""Tests of runtime/constrained/."""
