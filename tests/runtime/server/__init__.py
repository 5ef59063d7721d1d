"""Tests of runtime/server/."""
