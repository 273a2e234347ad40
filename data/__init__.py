"""chimera.data."""
