"""Bundled data sets (see docs/data.md)."""
