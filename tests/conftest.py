"""Shared fixtures: `demo_data` builds the fast synthetic data set once per test session."""

from __future__ import annotations

import pytest

from data_pipeline.demo_data import DemoData, make_demo_data


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """Synthetic texts, pairs and interleaved docs -> tokenizer, random-init VAE, packed shards, data.yaml.

    Small shapes: 64x64 images, 8x VAE with 8 channels (8x8x8 latents), patch 2 (16 patches), seq_len 256.
    Attributes: root, config_path, data_config (DataConfig), tokenizer, vae, latent_shape, patch_size, vocab_size.
    """
    return make_demo_data(tmp_path_factory.mktemp("demo_data"), seed=0, fast=True)
