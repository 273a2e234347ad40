"""chimera.models."""
