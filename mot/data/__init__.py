"""Interleaved documents, prepared shards and the packed loader (synthetic batches for now)."""
