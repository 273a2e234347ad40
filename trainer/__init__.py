"""chimera.trainer."""
