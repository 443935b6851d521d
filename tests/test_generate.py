"""Generation: the DDIM sampler against an oracle, greedy decoding against teacher forcing, CFG wiring."""

from __future__ import annotations

import torch

from contract.special_ids import SpecialIds
from pretrain.generate import _batch, generate_images, generate_text
from pretrain.model.diffusion import add_noise, cosine_alpha_bar, ddim_sample
from test_model import build, tiny_cfg

SP = SpecialIds(vocab_size=97, bos_id=1, eos_id=2, boi_id=3, eoi_id=4, pad_id=0)


def test_ddim_with_oracle_epsilon_recovers_x0() -> None:
    """If eps_fn returns the exact noise of a fixed x0, DDIM lands on x0 (any step count)."""
    ab = cosine_alpha_bar(1000)
    x0 = torch.randn(3, 8, 4, 4)

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ab[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    for steps in (10, 50):
        out = ddim_sample(oracle, torch.randn(3, 8, 4, 4), ab, steps)
        torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


def test_cosine_schedule_shape() -> None:
    ab = cosine_alpha_bar(1000)
    assert ab.shape == (1000,) and (ab[1:] < ab[:-1]).all() and 0.99 < ab[0] <= 1 and ab[-1] < 1e-3
    x = add_noise(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([0, 999]), ab)
    torch.testing.assert_close(x[:, 0, 0, 0], ab[[0, 999]].sqrt())


def test_greedy_text_matches_teacher_forcing() -> None:
    """Each generated token is the argmax of a single full forward over the final sequence."""
    model = build(tiny_cfg())
    prompts = [[5, 6, 7], [8]]
    new = generate_text(model, prompts, SP, max_new_tokens=5)
    for prompt, gen in zip(prompts, new):
        seq = [SP.bos_id, *prompt, *gen]
        batch = _batch(model, [seq], torch.zeros(0, 8, 8, 8), torch.zeros(0, dtype=torch.long), SP.pad_id)
        with torch.no_grad():
            h, _ = model.hidden_and_eps(batch, torch.zeros(1, 8, 8, 8), torch.zeros(1, dtype=torch.long))
        pred = model.lm_logits(h).argmax(-1)  # (L,)
        start = 1 + len(prompt)
        assert gen == pred[start - 1 : start - 1 + len(gen)].tolist()


def test_no_prompts_no_work() -> None:
    assert generate_text(build(tiny_cfg()), [], SP) == []


def test_images_deterministic_and_guidance_matters() -> None:
    model = build(tiny_cfg())
    with torch.no_grad():  # give the zero-initialised epsilon layer some weight so guidance has an effect
        model.patch_decoder.proj.weight.normal_(0, 0.02)
    a = generate_images(model, [[5, 6], [7]], SP, steps=4, cfg_scale=3.0, seed=1)
    b = generate_images(model, [[5, 6], [7]], SP, steps=4, cfg_scale=3.0, seed=1)
    c = generate_images(model, [[5, 6], [7]], SP, steps=4, cfg_scale=1.0, seed=1)
    assert a.shape == (2, 8, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_tensorboard_samples_writes_png_grid_image_and_captions(demo_data, tmp_path) -> None:
    """The trainer's sample hook: a PNG grid on disk, an image and captions in TensorBoard (read back)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.config import load_config
    from pretrain.generate import tensorboard_samples
    from pretrain.metrics import MetricsWriter

    cfg = load_config(["configs/tiny.yaml", str(demo_data.config_path)],
                      [f"train.run_dir={tmp_path}", "logging.sample_steps=3", f"data.vae={demo_data.vae}"])
    torch.manual_seed(0)
    from pretrain.model import Transfusion

    model = Transfusion(cfg.model)
    writer = MetricsWriter(tmp_path, True, True, 1.0, None, 1, cfg.model.patches_per_image)
    tensorboard_samples(model, cfg, writer, step=7)
    writer.close()
    assert (tmp_path / "samples" / "step_0000007.png").stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "samples/images" in acc.Tags()["images"]
    img = acc.Images("samples/images")[0]
    assert img.step == 7 and img.width > 64 and img.height >= 64
    text = acc.Tensors("samples/captions_text_summary" if "samples/captions_text_summary" in acc.Tags()["tensors"]
                       else "samples/captions/text_summary")[0]
    assert b"a red circle at the top left" in text.tensor_proto.string_val[0]


def test_ddim_clamps_x0_so_a_small_eps_error_cannot_blow_up() -> None:
    """alpha_bar(T-1) ~ 2e-9: an epsilon error of 1e-2 at t = T-1 becomes ~2e2 in the x0 estimate.

    One DDIM step from t = T-1 returns that estimate: clamped it stays a plausible latent.
    """
    ab = cosine_alpha_bar(1000)
    x0 = torch.randn(2, 8, 4, 4).clamp(-3, 3)
    g = torch.Generator().manual_seed(0)

    def slightly_wrong(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ab[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt() + 1e-2 * torch.randn(x.shape, generator=g)

    noise = torch.randn(2, 8, 4, 4)
    assert ddim_sample(slightly_wrong, noise, ab, 1).abs().max() <= 5.0
    assert ddim_sample(slightly_wrong, noise, ab, 1, clip_x0=None).abs().max() > 50.0
