"""Shared pytest configuration. Fixtures that only one test module needs live in that module."""
