"""Shared fixtures: `demo_data` builds the fast synthetic data set once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from data_pipeline.demo_data import DemoData, make_demo_data

# Every process the tests start (torchrun, deepspeed, accelerate, sbatch jobs) finds this venv's tools
# first, above all its `ninja`: torch JIT-builds DeepSpeed's cpu_adam with the first ninja on PATH, and
# a machine with a second ninja (apt's 1.11 beside pip's 1.13) rebuilt the op at every launch that found
# the other one, since each version discards the other's build log (ci/build_deepspeed_ops.py).
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = os.pathsep.join([_VENV_BIN, os.environ.get("PATH", "")])


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """Synthetic texts, pairs and interleaved docs -> tokenizer, random-init VAE, packed shards, data.yaml.

    Small shapes: 64x64 images, 8x VAE with 8 channels (8x8x8 latents), patch 2 (16 patches), seq_len 256.
    Attributes: root, config_path, data_config (DataConfig), tokenizer, vae, latent_shape, patch_size, vocab_size.
    """
    return make_demo_data(tmp_path_factory.mktemp("demo_data"), seed=0, fast=True)
