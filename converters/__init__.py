"""Checkpoint converters (HF dir, GGUF, Meta) to shard directories, and the inspector."""
