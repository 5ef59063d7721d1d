"""Tests of runtime/models/."""
