"""The pixel judge, caption parsing, the generator's variation and held-out combinations, the evaluation
report, and the diffusion loss weighting switch."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest
import torch

from data_pipeline import synthetic
from pretrain.evaluation.evaluate import CHANCE, combos, score, score_captions
from pretrain.evaluation.judge import connected_components, judge, parse_caption


def _generator_images(draws: int, seed: int) -> tuple[list[np.ndarray], list[tuple[str, str, str]]]:
    rng = np.random.default_rng(seed)
    scenes = list(itertools.product(synthetic.COLORS, synthetic.SHAPES, synthetic.PLACES)) * draws
    return [np.asarray(synthetic.draw_scene(rng, sc, 64)) for sc in scenes], scenes


def test_judge_reads_the_generators_own_images() -> None:
    """Every combination, two fresh random looks each (324 images): >= 99% right in every attribute."""
    images, scenes = _generator_images(2, seed=7)
    s = score([judge(im) for im in images], scenes)
    assert min(s["color"], s["shape"], s["place"], s["one_object"]) >= 0.99, s


@pytest.mark.parametrize("kind", ["uniform", "smooth", "blobs"])
def test_judge_is_at_chance_on_noise(kind: str) -> None:
    """Noise images scored against random scenes stay near chance, so the judge can fail a model.

    uniform: pixel noise; smooth: 8x8 noise upsampled (what a broken decoder gives); blobs: 2-5
    random palette discs (a model that draws several objects).
    """
    rng = np.random.default_rng(3)
    n = 300
    images = []
    for _ in range(n):
        if kind == "uniform":
            im = rng.integers(0, 256, (64, 64, 3))
        elif kind == "smooth":
            im = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1)))
        else:
            im = np.full((64, 64, 3), 255)
            yy, xx = np.mgrid[:64, :64]
            for _ in range(int(rng.integers(2, 6))):
                cy, cx, r = rng.integers(6, 58), rng.integers(6, 58), rng.integers(3, 7)
                im[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = list(synthetic.COLORS.values())[rng.integers(6)]
        images.append(im.astype(np.uint8))
    pool = combos(False)
    scenes = [pool[i] for i in rng.integers(0, len(pool), n)]
    s = score([judge(im) for im in images], scenes)
    assert s["color"] < CHANCE["color"] + 0.1 and s["shape"] < CHANCE["shape"] + 0.12, s
    assert s["place"] < CHANCE["place"] + 0.08 and s["all_three"] < 0.03, s
    assert s["one_object"] < 0.1, s


def test_connected_components_and_object_count() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[1:3, 1:3] = True  # a square
    mask[5:9, 6] = True  # a line...
    mask[8, 7:11] = True  # ...bent into an L: one component
    mask[3, 3] = True  # touches the square diagonally (8-connected)
    labels, n = connected_components(mask)
    assert n == 2 and labels[1, 1] == labels[3, 3] != labels[5, 6] == labels[8, 10]
    img = np.full((64, 64, 3), 255, np.uint8)
    img[5:15, 5:15] = synthetic.COLORS["red"]
    img[40:52, 40:52] = synthetic.COLORS["blue"]
    img[30, 30] = (0, 0, 0)  # a speck: not an object
    v = judge(img)
    assert (v.objects, v.smears, v.one_object) == (2, 0, False)
    img[:] = 255
    img[2:-2, 2:-2] = synthetic.COLORS["green"]  # a smear covering the image is no object
    v = judge(img)
    assert (v.objects, v.smears, v.one_object) == (0, 1, False)


def test_parse_caption() -> None:
    assert parse_caption("a red circle at the top left") == ("red", "circle", "top left")
    assert parse_caption("a blue square in the center.") == ("blue", "square", "center")
    assert parse_caption("a green triangle at the bottom") == ("green", "triangle", "bottom")
    assert parse_caption("a shape at the") == (None, None, None)
    s = score_captions(["a red circle at the top", "a red square at the left"], [("red", "circle", "top")] * 2)
    assert (s["color"], s["shape"], s["place"], s["all_three"]) == (1.0, 0.5, 0.5, 0.5)


def test_generator_varies_looks_and_keeps_held_out_combinations_out(tmp_path) -> None:
    rng = np.random.default_rng(0)
    a, b = (np.asarray(synthetic.draw_scene(rng, ("red", "square", "top"), 64)) for _ in range(2))
    assert not np.array_equal(a, b)  # fresh draws differ
    paths = synthetic.write_demo_sources(tmp_path, seed=0, n_pairs=400, n_texts=300, n_interleaved=60, size=32)
    text = " ".join(p.read_text() for p in paths.values())
    # "at the bottom" must not match "at the bottom left"
    held = [synthetic.caption_for(*c) for c in synthetic.HELD_OUT]
    assert not [h for h in held if re.search(re.escape(h) + r"(?! left| right)\b", text)]
    seen = {json.loads(line)["caption"] for line in paths["pairs"].read_text().splitlines()}
    assert len(seen) > 100  # the other combinations are there
    for color, shape, place in synthetic.HELD_OUT:  # each part of a held-out combination is still seen
        assert any(color in c for c in seen) and any(shape in c for c in seen) and any(place in c for c in seen)


def test_v_trunc_weighting() -> None:
    """v_trunc weights are min(1/alpha_bar, cap) / mean: mean 1, rising with t; eps weights are all 1."""
    from pretrain.model.diffusion import cosine_alpha_bar, timestep_loss_weights

    ab = cosine_alpha_bar(1000)
    assert torch.equal(timestep_loss_weights(ab, "eps", 20.0), torch.ones(1000))
    w = timestep_loss_weights(ab, "v_trunc", 20.0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert bool((w[1:] >= w[:-1]).all()) and float(w[-1] / w[0]) == pytest.approx(20.0 * float(ab[0]), rel=1e-5)
    with pytest.raises(ValueError, match="unknown diffusion loss weighting"):
        timestep_loss_weights(ab, "snr", 5.0)


def test_model_diffusion_loss_uses_the_weighting() -> None:
    """The model's diffusion sum equals sum_i w(t_i) * MSE_i computed by hand."""
    from batches import random_batch
    from pretrain.model.diffusion import add_noise
    from test_model import build, tiny_cfg

    cfg = tiny_cfg(diffusion_loss_weighting="v_trunc")
    model = build(cfg)
    with torch.no_grad():
        model.patch_decoder.proj.weight.normal_(0, 0.02)
        batch = random_batch(cfg, 2, 96, seed=0)
        out = model(batch)
        cpu = torch.device("cpu")
        x_t = add_noise(batch.latents, batch.noise, batch.timesteps, model.alpha_bar(cpu))
        _, eps = model.hidden_and_sampler_input(batch, x_t, batch.timesteps)
    mse = (eps - batch.noise).pow(2).mean(dim=(1, 2, 3))  # (N,)
    w = model.timestep_weights(cpu)[batch.timesteps]
    assert batch.num_images >= 2 and not torch.allclose(w, torch.ones_like(w))
    torch.testing.assert_close(out.diffusion_loss_sum, (w * mse).sum())


def test_evaluate_report_grid_and_tensorboard_scalars(demo_data, tmp_path) -> None:
    """evaluate() on a (random) model: every part and split in the report, a PNG grid, and the flat scalars
    the trainer logs read back with TensorBoard's own reader."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from contract.special_ids import load_special_ids
    from data_pipeline.tokenizer import Tokenizer
    from data_pipeline.vae import load_vae
    from pretrain.evaluation import evaluate
    from pretrain.config import load_config
    from pretrain.train.metrics import MetricsWriter
    from pretrain.model import Transfusion

    cfg = load_config(["configs/tiny.yaml", str(demo_data.config_path)])
    torch.manual_seed(0)
    model = Transfusion(cfg.model)
    sp = load_special_ids(demo_data.tokenizer)
    st = evaluate.EvalSettings(steps=2, captions=9, vae_images=9, text_docs=4)
    report, pixels, prompts = evaluate.evaluate(model, sp, Tokenizer(demo_data.tokenizer), load_vae(demo_data.vae), st)
    assert pixels.shape == (162, 64, 64, 3) and len(prompts) == 162 and prompts[-1] in [
        synthetic.caption_for(*c) for c in synthetic.HELD_OUT]
    for part in ("vae", "text_to_image", "captions"):
        assert set(report[part]) == {"seen", "held_out"}
    assert report["captions"]["seen"]["n"] == 9 and report["text"]["tokens"] > 0
    # a random model: perplexity about the vocabulary size, not better than chance
    assert report["text"]["perplexity"] > 0.3 * demo_data.vocab_size
    out = evaluate.write_report(report, pixels, prompts, tmp_path / "eval")
    assert Image.open(out / "grid.png").size[0] >= 9 * 64 and json.loads((out / "report.json").read_text()) == report
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True, flops_per_step=1.0, peak_flops=None, world_size=1,
                           patches_per_image=cfg.model.patches_per_image)
    scalars = evaluate.flat_scalars(report)
    writer.scalars(scalars, 3)
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert set(scalars) <= set(acc.Tags()["scalars"])
    got = acc.Scalars("eval/text_to_image/seen/one_object")[0]
    assert got.step == 3 and got.value == pytest.approx(report["text_to_image"]["seen"]["one_object"])
    assert "text_to_image (held_out)" in evaluate.table(report)


def test_trainer_hook_writes_report_and_scalars(demo_data, tmp_path) -> None:
    """pretrain.evaluation.hooks.periodic_evaluation, the trainer's hook, on a (single-process) model: report and grid
    under RUN_DIR/eval/step_N,
    eval/* scalars in TensorBoard (the 2-rank ZeRO-3 path is tests/test_train_e2e.py)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.config import load_config
    from pretrain.evaluation.hooks import periodic_evaluation
    from pretrain.model import Transfusion
    from pretrain.train.hooks import HookContext
    from pretrain.train.metrics import MetricsWriter

    cfg = load_config(["configs/tiny.yaml", str(demo_data.config_path)], [f"train.run_dir={tmp_path}",
                                                                          "logging.sample_steps=2"])
    torch.manual_seed(0)
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True, flops_per_step=1.0, peak_flops=None, world_size=1,
                           patches_per_image=cfg.model.patches_per_image)
    periodic_evaluation(HookContext(Transfusion(cfg.model), cfg, writer, 20, is_main=True))
    writer.close()
    report = json.loads((tmp_path / "eval" / "step_0000020" / "report.json").read_text())
    assert (tmp_path / "eval" / "step_0000020" / "grid.png").stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    got = acc.Scalars("eval/captions/seen/color")[0]
    assert got.step == 20 and got.value == pytest.approx(report["captions"]["seen"]["color"])
