"""Offline data preparation (tokenizer, VAE latents, packed MDS shards) and the streaming loader."""
