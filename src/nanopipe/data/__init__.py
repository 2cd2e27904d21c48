"""Pretraining data: shard sources, the download stage, the packing data loader."""
