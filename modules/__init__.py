"""Transformer blocks, loadable from shard files; ``modules.registry`` maps model types to them."""
