"""Evaluation suites (``chimera eval``) and the architecture benchmark (``chimera bench-arch``)."""
