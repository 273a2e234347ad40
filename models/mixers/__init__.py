"""chimera.models.mixers."""
