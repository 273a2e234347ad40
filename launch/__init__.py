"""chimera.launch."""
