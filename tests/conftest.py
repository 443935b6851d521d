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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test on the `demo_data` fixture is slow: the fixture builds the demo data (synthetic sources,
    tokenizer, VAE, packed shards), and those tests train, export or run the pipeline end to end. Marked
    here, before `-m` deselects, so `make test-fast` (-m "not slow and not slurm") skips the build."""
    for item in items:
        if "demo_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """Synthetic texts, pairs and interleaved docs -> tokenizer, random-init VAE, packed shards, data.yaml.

    Small shapes: 64x64 images, 8x VAE with 8 channels (8x8x8 latents), patch 2 (16 patches), seq_len 256.
    Attributes: root, config_path, data_config (DataConfig), tokenizer, vae, latent_shape, patch_size, vocab_size.
    """
    return make_demo_data(tmp_path_factory.mktemp("demo_data"), seed=0, fast=True)


class S3:
    """A bucket on the loopback moto server: `bucket`, `endpoint`, `url(*parts)` -> s3://bucket/...,
    `env` (the variables a subprocess needs: S3_ENDPOINT_URL and AWS_* test credentials)."""

    def __init__(self, endpoint: str, bucket: str):
        self.endpoint, self.bucket = endpoint, bucket
        self.env = {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_server() -> str:
    """A real S3 API: moto's server mode on a free loopback port for the whole session; yields its endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> S3:
    """A fresh bucket on the session's moto server, with this process's environment pointing at it."""
    import re

    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{os.getpid() % 10000}"
    s = S3(s3_server, bucket)
    for k, v in s.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s.client().create_bucket(Bucket=bucket)
    return s
