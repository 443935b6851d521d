"""Generation: the DDIM sampler against an oracle, greedy decoding against teacher forcing, CFG wiring."""

from __future__ import annotations

import torch

import pytest

from contract.special_ids import SpecialIds
from pretrain.inference.generate import (ImageSampling, TextSampling, packed_batch, cfg_combine, generate,
                                         generate_images,
                               generate_text, sample_tokens)
from pretrain.model import Transfusion
from pretrain.model.diffusion import add_noise, cosine_alpha_bar, ddim_sample, diffusion_sample, make_scheduler
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
        batch = packed_batch(model, [seq], torch.zeros(0, 8, 8, 8), torch.zeros(0, dtype=torch.long), SP.pad_id)
        with torch.no_grad():
            h, _ = model.hidden_and_sampler_input(batch, torch.zeros(1, 8, 8, 8), torch.zeros(1, dtype=torch.long))
        pred = model.lm_logits(h).argmax(-1)  # (L,)
        start = 1 + len(prompt)
        assert gen == pred[start - 1 : start - 1 + len(gen)].tolist()


def test_no_prompts_no_work() -> None:
    assert generate_text(build(tiny_cfg()), [], SP) == []


def test_images_deterministic_and_guidance_matters() -> None:
    model = build(tiny_cfg())
    with torch.no_grad():  # give the zero-initialised epsilon layer some weight so guidance has an effect
        model.patch_decoder.proj.weight.normal_(0, 0.02)
    a = generate_images(model, [[5, 6], [7]], SP, ImageSampling(steps=4, cfg_scale=3.0), seed=1)
    b = generate_images(model, [[5, 6], [7]], SP, ImageSampling(steps=4, cfg_scale=3.0), seed=1)
    c = generate_images(model, [[5, 6], [7]], SP, ImageSampling(steps=4, cfg_scale=1.0), seed=1)
    assert a.shape == (2, 8, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_tensorboard_samples_writes_png_grid_image_and_captions(demo_data, tmp_path) -> None:
    """The trainer's sample hook: a PNG grid on disk, an image and captions in TensorBoard (read back)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.config import load_config
    from pretrain.inference.hooks import tensorboard_samples
    from pretrain.train.hooks import HookContext
    from pretrain.train.metrics import MetricsWriter

    cfg = load_config(["configs/tiny.yaml", str(demo_data.config_path)],
                      [f"train.run_dir={tmp_path}", "logging.sample_steps=3", f"data.vae={demo_data.vae}"])
    torch.manual_seed(0)
    from pretrain.model import Transfusion

    model = Transfusion(cfg.model)
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True, flops_per_step=1.0, peak_flops=None, world_size=1,
                           patches_per_image=cfg.model.patches_per_image)
    tensorboard_samples(HookContext(model, cfg, writer, 7, is_main=True))
    writer.close()
    assert (tmp_path / "samples" / "step_0000007.png").stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "samples/images" in acc.Tags()["images"]
    img = acc.Images("samples/images")[0]
    assert img.step == 7 and img.width > 64 and img.height >= 64
    text = acc.Tensors("samples/captions_text_summary" if "samples/captions_text_summary" in acc.Tags()["tensors"]
                       else "samples/captions/text_summary")[0]
    # one line per sample prompt (the data's validation captions since data_pipeline.prepare writes them)
    assert cfg.logging.sample_prompts and all(f"{p!r} -> ".encode() in text.tensor_proto.string_val[0]
                                              for p in cfg.logging.sample_prompts)


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


def test_schedule_equals_diffusers_squaredcos_cap_v2() -> None:
    """Our cosine schedule is diffusers' "squaredcos_cap_v2" (same formula; theirs in fp32, ours in fp64)."""
    from diffusers import DDPMScheduler

    ab = cosine_alpha_bar(1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(theirs, ab, rtol=2e-5, atol=1e-6)
    ours = make_scheduler(ab, "ddpm", 250).alphas_cumprod  # the samplers get our betas
    torch.testing.assert_close(ours, ab, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 50)])
def test_samplers_recover_a_gaussian_with_the_exact_epsilon(sampler: str, steps: int) -> None:
    """x0 ~ N(mu, s^2): x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), so E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / var_t.

    With that exact epsilon both samplers must return samples with mean mu and std s. Measured (20000
    samples): DDPM 250 steps std within 1.8%, DDIM 50 steps 2.9% low (its discretisation error; 10 steps
    is 16% low), means within 0.015.
    """
    ab = cosine_alpha_bar(1000).double()
    mu, s = torch.tensor([0.7, -1.5]).view(1, 2, 1, 1).double(), torch.tensor([0.4, 1.2]).view(1, 2, 1, 1).double()

    def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ab[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 2, 1, 1, generator=g, dtype=torch.float64)
    x = diffusion_sample(exact_eps, noise, ab, steps, sampler, generator=g)  # (20000, 2, 1, 1)
    torch.testing.assert_close(x.mean(0, keepdim=True), mu, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0, keepdim=True), s, atol=0, rtol=0.05)


def test_guidance_formula() -> None:
    c, u = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(cfg_combine(c, u, 3.0), torch.tensor([4.0, -5.0]))  # 1 + 3*(2-1), 1 + 3*(-1-1)
    assert torch.equal(cfg_combine(c, u, 1.0), c) and torch.equal(cfg_combine(c, u, 0.0), u)


def test_ddpm_images_reproducible_by_seed() -> None:
    model = build(tiny_cfg())
    with torch.no_grad():
        model.patch_decoder.proj.weight.normal_(0, 0.02)
    im = ImageSampling(steps=5, cfg_scale=2.0, sampler="ddpm")
    a, b, c = (generate_images(model, [[5, 6]], SP, im, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_text_sampling_filters() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # probabilities
    g = torch.Generator().manual_seed(0)
    assert sample_tokens(logits, TextSampling()).tolist() == [0]  # greedy
    assert sample_tokens(logits, TextSampling(temperature=5.0, top_k=1), g).tolist() == [0]

    def freq(s: TextSampling) -> torch.Tensor:
        ids = sample_tokens(logits.expand(20000, 4), s, g)
        return torch.bincount(ids, minlength=4) / 20000

    torch.testing.assert_close(freq(TextSampling(temperature=1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015,
                               rtol=0)
    # top-k 2 and top-p 0.8 both keep {0.5, 0.3}, renormalised to 5/8, 3/8
    for s in (TextSampling(temperature=1.0, top_k=2), TextSampling(temperature=1.0, top_p=0.8)):
        torch.testing.assert_close(freq(s), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    # temperature 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025 over their sum
    p = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    torch.testing.assert_close(freq(TextSampling(temperature=0.5)), p / p.sum(), atol=0.015, rtol=0)


def test_mixed_modal_text_image_text(tmp_path) -> None:
    """Prompt text -> a generated BOI -> an image -> text with the image in context; batched prompts."""
    model = build(tiny_cfg())
    bias = torch.zeros(model.cfg.vocab_size)
    bias[SP.boi_id] = 1e3  # the model always wants BOI: the first new token opens an image
    model.lm_logits = lambda h: Transfusion.lm_logits(model, h) + bias
    out = generate(model, [[[5, 6, 7]], [[8]]], SP, max_new_tokens=4, max_images=1,
                   image=ImageSampling(steps=3, cfg_scale=2.0, sampler="ddpm"))
    for row in out:
        assert isinstance(row[0], torch.Tensor) and row[0].shape == (8, 8, 8) and torch.isfinite(row[0]).all()
        assert isinstance(row[1], list) and 0 < len(row[1]) <= 3 and SP.boi_id not in row[1]  # budget 4 = BOI + 3 text
    # the text after the image is the greedy continuation of BOS prompt BOI image EOI (image at t = 0)
    assert out[0][1] == _after_image(model, out[0][0])


def _after_image(model, latent: torch.Tensor) -> list[int]:
    """Greedy 3 tokens after `BOS 5 6 7 BOI image EOI`, one uncached forward per token, BOI masked."""
    P = model.cfg.patches_per_image
    row, new = [SP.bos_id, 5, 6, 7, SP.boi_id, *[None] * P, SP.eoi_id], []
    for _ in range(3):
        batch = packed_batch(model, [row + new], latent[None], torch.zeros(1, dtype=torch.long), SP.pad_id)
        with torch.no_grad():
            h, _ = model.hidden_and_sampler_input(batch, latent[None], torch.zeros(1, dtype=torch.long))
        logits = model.lm_logits(h[len(row) + len(new) - 1])
        logits[SP.boi_id] = float("-inf")
        tok = int(logits.argmax())
        if tok == SP.eos_id:
            break
        new.append(tok)
    return new


@pytest.fixture
def random_export(demo_data, tmp_path):
    """An export directory (pretrain.artifacts.export's layout) of a randomly initialised tiny model."""
    import shutil

    from safetensors.torch import save_file

    from pretrain.config import load_config, save_config

    cfg = load_config(["configs/tiny.yaml", str(demo_data.config_path)])
    torch.manual_seed(0)
    out = tmp_path / "export"
    out.mkdir()
    save_file(Transfusion(cfg.model).state_dict(), out / "model.safetensors")
    shutil.copyfile(demo_data.tokenizer, out / "tokenizer.model")
    shutil.copyfile(demo_data.tokenizer.with_suffix(".json"), out / "tokenizer.json")
    shutil.copytree(demo_data.vae, out / "vae")
    save_config(cfg, out / "config.yaml")
    return out


def test_cli_mixed_modal_writes_pngs(random_export, tmp_path, capsys) -> None:
    from PIL import Image

    from pretrain.inference.generate import main

    main(["--model", str(random_export), "--out", str(tmp_path / "png"), "--mixed", "a red circle", "--mixed", "a",
          "--force-image", "--steps", "2", "--max-new-tokens", "3", "--temperature", "0.8", "--top-p", "0.9"])
    pngs = sorted((tmp_path / "png").glob("*.png"))  # named <prompt slug>_<sample>_img<image>
    assert [p.name for p in pngs] == ["a-red-circle_000_img00.png", "a_000_img00.png"]
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (64, 64)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("'a red circle' -> [") and str(pngs[0]) in lines[0]


def test_cli_bad_input_gets_a_message(random_export, tmp_path) -> None:
    from PIL import Image

    from pretrain.inference.generate import main

    tiny, junk = tmp_path / "tiny.png", tmp_path / "junk.png"
    Image.new("RGB", (4, 4)).save(tiny)
    junk.write_bytes(b"not an image")
    cases = [
        (["--model", str(tmp_path / "nope"), "--text", "a"], ["nope", "config.yaml missing",
                                                              "pretrain.artifacts.export"]),
        (["--model", str(random_export), "--caption", str(tiny)], [str(tiny), "too_small", "at least 8x8"]),
        (["--model", str(random_export), "--caption", str(junk)], [str(junk), "not a usable image"]),
        (["--model", str(random_export), "--caption", str(tmp_path / "gone.png")], ["gone.png", "cannot read"]),
        (["--model", str(random_export), "--prompt", "a", "--sampler", "euler"],
         ["--sampler='euler'", "model.objective='ddpm'", "ddpm or ddim"]),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and all(w in msg for w in words), msg
    (random_export / "model.safetensors").unlink()
    with pytest.raises(SystemExit) as e:
        main(["--model", str(random_export), "--text", "a"])
    assert "model.safetensors missing" in str(e.value.code)
