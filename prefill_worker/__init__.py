"""Prefill workers: run prompts in batches, sample the first token, hand the KV to decode."""
