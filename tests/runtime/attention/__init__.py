"""Tests of runtime/attention/."""
