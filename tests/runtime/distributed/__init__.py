"""Tests of runtime/distributed/."""
