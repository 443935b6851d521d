"""FID through torch-fidelity, with a tiny stand-in feature extractor (Inception weights are not here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import torch_fidelity  # the optional extra [fid]; pinned in ci/requirements.txt
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from pretrain.evaluation.fid import fid


class ChannelStats(FeatureExtractorBase):
    """Stand-in for Inception: per-channel mean and std of the uint8 image (6 features)."""

    def __init__(self, name: str, features_list: list[str], **kwargs: object) -> None:
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("stats",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "stats"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (features(x),)


def features(x: torch.Tensor) -> torch.Tensor:
    f = x.float()  # (N, 3, H, W)
    return torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)  # (N, 6)


torch_fidelity.register_feature_extractor("test-channel-stats", ChannelStats)


def _folder(path, seed: int, shift: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    path.mkdir()
    imgs = []
    for i in range(24):
        a = (rng.integers(0, 160, (16, 16, 3)) + rng.integers(0, 60, 3) + shift).clip(0, 255).astype(np.uint8)
        Image.fromarray(a).save(path / f"{i:02d}.png")
        imgs.append(a.transpose(2, 0, 1))
    return np.stack(imgs)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Heusel et al. 2017: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed here with scipy."""
    from scipy import linalg

    fa, fb = (features(torch.from_numpy(x)).double().numpy() for x in (a, b))
    m1, m2, s1, s2 = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_the_formula_and_orders_distributions(tmp_path) -> None:
    a = _folder(tmp_path / "a", 0, 0)
    b = _folder(tmp_path / "b", 1, 0)
    c = _folder(tmp_path / "c", 2, 60)
    ab = fid(tmp_path / "a", tmp_path / "b", feature_extractor="test-channel-stats")
    ac = fid(tmp_path / "a", tmp_path / "c", feature_extractor="test-channel-stats")
    assert ab == pytest.approx(_reference_fid(a, b), rel=1e-3)
    assert ac == pytest.approx(_reference_fid(a, c), rel=1e-3)
    assert ac > 5 * ab  # brighter images are farther than a second draw of the same distribution
    assert fid(tmp_path / "a", tmp_path / "a", feature_extractor="test-channel-stats") == pytest.approx(0, abs=1e-3)


def test_fid_needs_local_plain_weights(tmp_path) -> None:
    (tmp_path / "g").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        fid(tmp_path / "g", tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        fid(tmp_path / "g", tmp_path / "missing", feature_extractor="test-channel-stats")
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1), "f": _folder}, bad)  # a function: not loadable with weights_only
    with pytest.raises(ValueError, match="refusing to unpickle"):
        fid(tmp_path / "g", tmp_path / "g", weights=bad)
