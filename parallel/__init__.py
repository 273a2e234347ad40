"""chimera.parallel."""
