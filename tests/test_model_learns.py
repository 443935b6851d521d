"""The model learns the synthetic task: the demo's data recipe (a trained VAE) and training recipe
(configs/demo.yaml) for a few hundred steps of the real 2-rank DeepSpeed trainer (ZeRO-2, the demo's stage),
exported, then judged by `python -m pretrain.evaluation.evaluate` on fresh draws (pixels and caption words, not
the model's own claims).

Floors and why luck cannot pass them: each is far above chance for its sample size. With n judged
items and chance p, the binomial tail P(X >= floor * n) is given next to each floor; the untrained
model scores at chance (tests/test_evaluate.py). The figures they guard (docs/quality.md) are well
above the floors, so a real regression, not noise, is what fails them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from contract.dist_env import free_port
from data_pipeline.demo_data import DemoData, DemoSizes, make_demo_data
from pretrain.evaluation.evaluate import CHANCE

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = 800  # the demo trains as many as fit 500 s: 5,500 on this machine (docs/quality.md §17)


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.fixture(scope="module")
def trained_vae_data(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """The demo's data as `make demo` makes it: 2,000 pairs, the 4x VAE trained 1,600 steps with latent
    noise 0.5 (a 300-step one, as this test used before, kept colour 43% of the time with the latent
    noise), 16 patches per image."""
    return make_demo_data(tmp_path_factory.mktemp("learn") / "data", seed=0, fast=False, sizes=DemoSizes())


def test_demo_vae_keeps_what_the_judge_checks_also_under_latent_noise(trained_vae_data: DemoData) -> None:
    """The VAE's reconstructions of 162 fresh draws are judged right in all three attributes >= 90%, and
    with 0.3 latent stds of noise added before decoding the shape is still right >= 92% of the time.

    Chance for all three is 1/162 (0.6%): P(X >= 146 of 162) at p = 1/162 is below 1e-100; an untrained
    VAE scores 0 (it draws no object). Measured (docs/quality.md §15, the same draws): 98.8% all three;
    shape under noise 97.5%, where the same VAE trained without latent noise (the demo's until then) kept
    86.4%, the decoder fault that cost the model a tenth of its shapes: this floor fails on it.
    """
    from data_pipeline.vae import load_vae
    from pretrain.evaluation.evaluate import vae_ceiling

    vae = load_vae(trained_vae_data.vae)
    s = vae_ceiling(vae, 162, 64, seed=0)["seen"]
    assert s["all_three"] >= 0.9 and s["place"] >= 0.9, s
    noisy = vae_ceiling(vae, 162, 64, seed=0, latent_noise=0.3)["seen"]
    assert noisy["shape"] >= 0.92, noisy


def test_demo_recipe_learns_to_caption_and_to_place(trained_vae_data: DemoData, tmp_path: Path) -> None:
    """STEPS steps of `pretrain.train` (2 ranks, configs/demo.yaml: ZeRO-2), export, evaluate."""
    run_dir, export, ev = tmp_path / "run", tmp_path / "export", tmp_path / "eval"
    config = f"{REPO / 'configs/tiny.yaml'},{REPO / 'configs/demo.yaml'},{trained_vae_data.config_path}"
    py = sys.executable
    train = [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             "-m", "pretrain.train", "--config", config, f"train.run_dir={run_dir}", f"train.steps={STEPS}",
             f"checkpoint.every={STEPS}", "logging.val_every=0", "logging.sample_every=0", "logging.every=100",
             f"data.cache_dir={tmp_path / 'cache'}"]
    for cmd in (train, [py, "-m", "pretrain.artifacts.export", "--run-dir", str(run_dir), "--out", str(export)],
                [py, "-m", "pretrain.evaluation.evaluate", "--model", str(export), "--out", str(ev), "--captions",
                 "81"]):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                              env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                                   "PATH": str(Path(py).parent) + ":/usr/bin:/bin"})
        assert done.returncode == 0, f"{cmd[2:5]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    report = json.loads((ev / "report.json").read_text())
    t2i, cap = report["text_to_image"]["seen"], report["captions"]["seen"]
    n_t2i, n_cap = 154, 81
    # floors: (measured value, floor, chance, n) -> the tail at the floor is printed on failure
    # measured on this test's run (CI rehearsal of round 22: the demo's VAE, 800 steps with latent noise
    # 0.5; the flow recipe, 8 heads, captioning cap t <= 100, 800 training steps; docs/quality.md §13, §15),
    # sampled with euler_ancestral at CFG 2.5 (§14): captions colour 96.3, place 95.1, all three 53.1;
    # text -> image colour 95.5, place 92.2, one object 85.7, shape 52.6 (no shape floor: 800 steps are
    # far from the shape the demo reaches)
    checks = {
        "captions colour": (cap["color"], 0.75, CHANCE["color"], n_cap),  # P(X >= 61 of 81 | 1/6) ~ 5e-31
        "captions place": (cap["place"], 0.75, CHANCE["place"], n_cap),  # P(X >= 61 of 81 | 1/9) ~ 3e-41
        "captions all three": (cap["all_three"], 0.30, CHANCE["all_three"], n_cap),  # P(X >= 25 of 81 | 1/162) ~ 2e-35
        "text->image colour": (t2i["color"], 0.40, CHANCE["color"], n_t2i),  # P(X >= 62 of 154 | 1/6) ~ 1e-12
        "text->image place": (t2i["place"], 0.35, CHANCE["place"], n_t2i),  # P(X >= 54 of 154 | 1/9) ~ 1e-15
    }
    low = {k: (v, floor, f"tail {binomial_tail(n, math.ceil(floor * n), p):.1e}")
           for k, (v, floor, p, n) in checks.items() if v < floor}
    assert not low, f"below the floors: {low}; report {ev / 'report.json'}"
    for k, (_, floor, p, n) in checks.items():
        assert binomial_tail(n, math.ceil(floor * n), p) < 1e-4, k  # each floor is itself far from luck
