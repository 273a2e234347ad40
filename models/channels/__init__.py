"""Channel mixers (position-wise): the gated MLP and mixture of experts; one file each, with SPECS."""
