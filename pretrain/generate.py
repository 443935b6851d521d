"""Generation: greedy text, captions of images, and images from text (DDIM with classifier-free guidance).

Single-device functions over a `Transfusion` model: under ZeRO-3 every rank calls them with the same
prompts, so control flow (and so parameter gathering) is identical everywhere. Layouts follow the
training data: caption-first `BOS caption BOI patches EOI EOS`, dropped caption `BOS BOI patches EOI`,
image-first `BOS BOI patches EOI caption EOS`.

    python -m pretrain.generate --model EXPORT_DIR --prompt "a red circle at the top left" --out samples/
    python -m pretrain.generate --model EXPORT_DIR --caption image.png
    python -m pretrain.generate --model EXPORT_DIR --text "Once upon a time"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from contract.batch import IGNORE_INDEX, TransfusionBatch
from contract.special_ids import SpecialIds, load_special_ids
from data_pipeline.images import load_image, to_uint8
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.vae import Vae, decode, encode, load_vae
from pretrain.config import Config, load_config
from pretrain.model import Transfusion
from pretrain.model.diffusion import ddim_sample

TokenSeq = list[int | None]  # one sequence being generated: token ids, None at the patch positions of its image


def _batch(model: Transfusion, rows: list[TokenSeq], latents: torch.Tensor, t: torch.Tensor, pad: int) -> TransfusionBatch:
    """Right-padded batch of rows (each one document, at most one image) in the model's contract."""
    L = max(len(r) for r in rows)
    B, device = len(rows), latents.device
    tokens = torch.full((B, L), pad, dtype=torch.long)
    image_ids = torch.full((B, L), -1, dtype=torch.long)
    doc_ids = torch.ones(B, L, dtype=torch.long)  # padding: document 1
    n = 0
    for b, row in enumerate(rows):
        doc_ids[b, : len(row)] = 0
        has_image = False
        for i, tok in enumerate(row):
            if tok is None:
                image_ids[b, i] = n
                has_image = True
            else:
                tokens[b, i] = tok
        n += has_image
    positions = torch.arange(L).expand(B, L).contiguous()
    return TransfusionBatch(
        tokens=tokens.to(device), targets=torch.full_like(tokens, IGNORE_INDEX).to(device), doc_ids=doc_ids.to(device),
        image_ids=image_ids.to(device), positions=positions.to(device), latents=latents, noise=torch.zeros_like(latents),
        timesteps=t,
    )


@torch.no_grad()
def generate_images(
    model: Transfusion,
    prompts: list[list[int]],
    ids: SpecialIds,
    steps: int = 250,
    cfg_scale: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """Latents (N, C, H, W) for N tokenised captions (without BOS): DDIM from noise, CFG against a dropped caption."""
    cfg = model.cfg
    P, C, S = cfg.patches_per_image, cfg.latent_channels, cfg.latent_size
    device = next(model.parameters()).device
    n = len(prompts)
    rows: list[TokenSeq] = [[ids.bos_id, *p, ids.boi_id] + [None] * P for p in prompts]
    if cfg_scale != 1.0:
        rows += [[ids.bos_id, ids.boi_id] + [None] * P for _ in prompts]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, C, S, S, generator=g).to(device)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = len(rows) // n
        xs, ts = x.repeat(k, 1, 1, 1), t.repeat(k)  # (k*N, C, H, W)
        _, eps = model.hidden_and_eps(_batch(model, rows, xs, ts, ids.pad_id), xs, ts)  # (k*N, C, H, W)
        if k == 1:
            return eps
        cond, uncond = eps.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return ddim_sample(eps_fn, noise, model.alpha_bar(device), steps)


@torch.no_grad()
def generate_text(
    model: Transfusion,
    prompts: list[list[int]],
    ids: SpecialIds,
    max_new_tokens: int = 32,
    images: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy continuation of each prompt; with `images` (N, C, H, W) each prompt follows `BOS BOI image EOI`.

    Runs exactly max_new_tokens forward passes (no early exit) so every ZeRO-3 rank does the same work.
    """
    if not prompts:
        return []
    P = model.cfg.patches_per_image
    device = next(model.parameters()).device
    if images is None:
        rows: list[TokenSeq] = [[ids.bos_id, *p] for p in prompts]
        latents = torch.zeros(0, model.cfg.latent_channels, model.cfg.latent_size, model.cfg.latent_size, device=device)
    else:
        rows = [[ids.bos_id, ids.boi_id] + [None] * P + [ids.eoi_id, *p] for p in prompts]
        latents = images.to(device)
    t = torch.zeros(latents.shape[0], dtype=torch.long, device=device)  # clean images: t = 0
    new: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        batch = _batch(model, rows, latents, t, ids.pad_id)
        x_t = latents if latents.shape[0] else torch.zeros(1, *latents.shape[1:], device=device)
        h, _ = model.hidden_and_eps(batch, x_t, t if latents.shape[0] else t.new_zeros(1))
        last = torch.tensor([len(r) - 1 for r in rows], device=device) + torch.arange(len(rows), device=device) * batch.tokens.shape[1]
        next_ids = model.lm_logits(h[last]).argmax(dim=-1).tolist()  # (B,)
        for b, tok in enumerate(next_ids):
            rows[b].append(tok)
            if not done[b]:
                new[b].append(tok)
                done[b] = tok == ids.eos_id
    return [seq[:-1] if seq and seq[-1] == ids.eos_id else seq for seq in new]


def tensorboard_samples(model: Transfusion, cfg: Config, writer: object, step: int) -> None:
    """Generate images for cfg.logging.sample_prompts, caption them back, log a PNG grid and the text.

    Every rank must call this (ZeRO-3 forwards are collective); only the writer of rank 0 writes.
    """
    from torchvision.utils import make_grid, save_image

    lg = cfg.logging
    tok = Tokenizer(cfg.data.tokenizer)
    ids = tok.ids
    was_training = model.training
    model.eval()
    latents = generate_images(model, [tok.encode(p) for p in lg.sample_prompts], ids, lg.sample_steps,
                              lg.sample_cfg_scale, seed=step)
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
    x = latents[:, :3].float()
    x = x - x.amin(dim=(1, 2, 3), keepdim=True)
    return x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def load_exported(path: str | Path, device: str = "cpu") -> tuple[Transfusion, SpecialIds, Path]:
    """Model (`Transfusion.from_pretrained`), special ids and the export directory of `pretrain.export` output.

    Raises FileNotFoundError naming a missing file.
    """
    root = Path(path)
    if not (root / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{root / 'tokenizer.json'} missing: point --model at a directory written by pretrain.export")
    model = Transfusion.from_pretrained(root, device=device)
    return model, load_special_ids(root / "tokenizer.json"), root


def main(argv: list[str] | None = None) -> None:
    """CLI: images from prompts (PNG), captions of PNG images, or text continuations."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export directory (pretrain.export)")
    ap.add_argument("--prompt", action="append", default=[], help="caption to draw (repeatable)")
    ap.add_argument("--caption", action="append", default=[], help="PNG/JPEG image to caption (repeatable)")
    ap.add_argument("--text", action="append", default=[], help="text prompt to continue (repeatable)")
    ap.add_argument("--out", default="samples", help="directory for generated PNGs")
    ap.add_argument("--steps", type=int, default=250, help="DDIM steps (paper: 250)")
    ap.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (paper: 3-5)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, ids, root = load_exported(args.model)
    tok = Tokenizer(root / "tokenizer.model")
    vae = load_vae(root / "vae")
    if args.prompt:
        _draw(model, ids, tok, vae, args)
    if args.caption:
        _caption(model, ids, tok, vae, args)
    if args.text:
        for prompt, new in zip(args.text, generate_text(model, [tok.encode(p) for p in args.text], ids, args.max_new_tokens)):
            print(f"{prompt!r} -> {tok.decode(new)!r}")


def save_pngs(pixels: torch.Tensor, out: str | Path, prefix: str = "") -> list[Path]:
    """Write (N, 3, H, W) images in [-1, 1] as PNG files; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(pixels):
        path = out / f"{prefix}{i:03d}.png"
        Image.fromarray(to_uint8(img.cpu().numpy())).save(path)
        paths.append(path)
    return paths


def _draw(model: Transfusion, ids: SpecialIds, tok: Tokenizer, vae: Vae, args: argparse.Namespace) -> None:
    lat = generate_images(model, [tok.encode(p) for p in args.prompt], ids, args.steps, args.cfg_scale, args.seed)
    for prompt, path in zip(args.prompt, save_pngs(decode(vae, lat), args.out)):
        print(f"{prompt!r} -> {path}")


def _caption(model: Transfusion, ids: SpecialIds, tok: Tokenizer, vae: Vae, args: argparse.Namespace) -> None:
    size = model.cfg.latent_size * vae.downsample
    pixels = torch.from_numpy(np.stack([load_image(Path(p).read_bytes(), size) for p in args.caption]))
    lat = encode(vae, pixels)  # (N, C, h, w)
    for path, new in zip(args.caption, generate_text(model, [[] for _ in args.caption], ids, args.max_new_tokens, lat)):
        print(f"{path} -> {tok.decode(new)!r}")


if __name__ == "__main__":
    main()
