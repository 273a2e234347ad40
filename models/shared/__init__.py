"""Shared-block styles: how a block whose parameters exist once runs at each use; one file each, with STYLE."""
