"""Tests of runtime/parsers/."""
