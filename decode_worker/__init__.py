"""Decode workers: hold KV in a paged cache, run continuous batching, stream tokens back."""
