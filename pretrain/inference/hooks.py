"""The trainer's sampling hook: images from `logging.sample_prompts`, captioned back, to TensorBoard and PNG."""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipeline.tokenizer import Tokenizer
from data_pipeline.vae import decode, load_vae
from pretrain.inference.generate import ImageSampling, generate_images, generate_text
from pretrain.train.hooks import HookContext


def tensorboard_samples(ctx: HookContext) -> None:
    """Generate images for cfg.logging.sample_prompts, caption them back, log a PNG grid and the text.

    Every rank must call this (ZeRO-3 forwards are collective); only the writer of rank 0 writes.
    Output: RUN_DIR/samples/step_N.png and TensorBoard `samples/images`, `samples/captions`.
    """
    from torchvision.utils import make_grid, save_image

    model, cfg, writer, step = ctx.model, ctx.cfg, ctx.writer, ctx.step
    lg = cfg.logging
    tok = Tokenizer(cfg.data.tokenizer)
    ids = tok.ids
    was_training = model.training
    model.eval()
    latents = generate_images(model, [tok.encode(p) for p in lg.sample_prompts], ids,
                              ImageSampling(lg.sample_steps, lg.sample_cfg_scale, lg.sample_sampler), seed=step)
    captions = generate_text(model, [[] for _ in lg.sample_prompts], ids, 24, images=latents)
    model.train(was_training)
    pixels = _to_pixels(latents, cfg.data.vae)  # (N, 3, H, W) in [0, 1]
    grid = make_grid(pixels, nrow=min(4, len(pixels)), padding=2)  # (3, H', W')
    if getattr(writer, "enabled", False):
        out = Path(cfg.train.run_dir) / "samples" / f"step_{step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, out)
        writer.images("samples/images", grid, step)
        lines = [f"{p!r} -> {tok.decode(c)!r}" for p, c in zip(lg.sample_prompts, captions)]
        writer.text("samples/captions", "  \n".join(lines), step)


def _to_pixels(latents: torch.Tensor, vae_dir: str) -> torch.Tensor:
    """Decode with the VAE when one is configured, else show latent channels 0-2 rescaled; (N, 3, H, W) in [0, 1]."""
    if vae_dir:
        return (decode(load_vae(vae_dir, device=latents.device), latents.float()) + 1) / 2
    x = latents[:, :3].float()  # (N, 3, h, w)
    x = x - x.amin(dim=(1, 2, 3), keepdim=True)
    return x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
