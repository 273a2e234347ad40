"""Inference: batched, streaming generation over each mixer's O(1) decoding state, and a small server."""
