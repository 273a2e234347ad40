"""chimera.configs."""
