"""Infrastructure shared by every entry point: model config, shard store, tokenizer, I/O, communication."""
