"""Deduplication algorithms, one module each: exact (normalised text hash) and minhash (near-duplicate LSH)."""
