"""Evaluate a model on the synthetic shapes task, judged by pixels and words, never by the model itself.

    python -m pretrain.evaluation.evaluate --model EXPORT_DIR --out DIR [--per-combo 1] [--steps 100] [--cfg-scale 3]

Writes DIR/report.json, DIR/grid.png (prompts over their samples) and prints a table:

- **vae**: fresh generator draws, encoded and decoded by the VAE, judged (the ceiling of the rest);
- **text_to_image**: one prompt per (colour, shape, place) combination (x `per_combo`), sampled with
  the sampler, steps and classifier-free guidance the export recorded (`read_export_record`; the
  trainer's logging.sample_* defaults: the objective's sampler, 100 steps, CFG 3),
  decoded, judged by `pretrain.evaluation.judge` (colour, shape, place, exactly one object, all three right);
- **captions**: fresh draws encoded, captioned greedily, the caption's words checked;
- **text**: LM loss and perplexity on fresh synthetic text documents;

each for the combinations seen in training and, separately, the `HELD_OUT` ones that no training
source contains (compositional generalisation). Fresh draws: the generator varies size, offset and
rotation per image, and evaluation uses its own seed, so no evaluation image is a training image.

`evaluate(model, ...)` is the same function the trainer calls every `logging.eval_every` steps; under
ZeRO-3 every rank calls it with the same arguments (identical forwards), and ranks get the same report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch

from data_pipeline import images as imglib
from data_pipeline import synthetic
from pretrain.evaluation.judge import Verdict, judge, parse_caption
from pretrain.model.config import Sampler

EVAL_SEED = 1_000_003  # the generator's seed for evaluation draws (training data uses train.seed-derived seeds)
#: what a guess scores: 1 / the number of values of each attribute (data_pipeline.synthetic), all three at once
#: the product (1/6, 1/3, 1/9 and 1/162 for the 6 colours, 3 shapes and 9 places)
CHANCE = {"color": 1 / len(synthetic.COLORS), "shape": 1 / len(synthetic.SHAPES), "place": 1 / len(synthetic.PLACES),
          "all_three": 1 / (len(synthetic.COLORS) * len(synthetic.SHAPES) * len(synthetic.PLACES))}


@dataclass
class EvalSettings:
    """How much to evaluate: prompts per combination, sampler settings, caption and text sample counts."""

    per_combo: int = 1  # text->image samples per (colour, shape, place) combination
    # sampling; None = what the export recorded (pretrain.inference.generate.resolve_sampling: its logging.sample_*,
    # the objective's own sampler unless set), for a model not loaded from an export LoggingConfig's defaults
    steps: int | None = None  # denoising steps
    cfg_scale: float | None = None  # classifier-free guidance scale
    sampler: Sampler | None = None  # ddpm/ddim (objective=ddpm) or euler/euler_ancestral (objective=flow)
    captions: int = 162  # fresh images captioned (seen combinations); held-out: 4 per combination
    vae_images: int = 162  # fresh images through the VAE
    text_docs: int = 64  # fresh text documents for the LM loss
    seed: int = 0


def combos(held_out: bool) -> list[tuple[str, str, str]]:
    """All (colour, shape, place) combinations seen in training, or the held-out ones."""
    every = itertools.product(synthetic.COLORS, synthetic.SHAPES, synthetic.PLACES)
    return [c for c in every if (c in synthetic.HELD_OUT) == held_out]


def score(verdicts: list[Verdict], scenes: list[tuple[str, str, str]]) -> dict[str, float]:
    """Accuracies (0-1) of verdicts against the intended scenes: colour, shape, place, all_three, one_object."""
    n = max(len(scenes), 1)
    right = [(v.color == c, v.shape == s, v.place == p) for v, (c, s, p) in zip(verdicts, scenes)]
    return {
        "color": sum(r[0] for r in right) / n, "shape": sum(r[1] for r in right) / n,
        "place": sum(r[2] for r in right) / n, "all_three": sum(all(r) for r in right) / n,
        "one_object": sum(v.one_object for v in verdicts) / n, "n": len(scenes),
    }


def score_captions(captions: list[str], scenes: list[tuple[str, str, str]]) -> dict[str, float]:
    """Word accuracies (0-1) of captions against the scenes they describe."""
    n = max(len(scenes), 1)
    right = [tuple(a == b for a, b in zip(parse_caption(t), sc)) for t, sc in zip(captions, scenes)]
    return {"color": sum(r[0] for r in right) / n, "shape": sum(r[1] for r in right) / n,
            "place": sum(r[2] for r in right) / n, "all_three": sum(all(r) for r in right) / n, "n": len(scenes)}


def fresh_images(scenes: list[tuple[str, str, str]], size: int, rng: np.random.Generator) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]: each scene drawn with a random look."""
    arr = np.stack([np.asarray(synthetic.draw_scene(rng, sc, size)) for sc in scenes])  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 (data_pipeline.images.to_uint8 of the tensor)."""
    return imglib.to_uint8(pixels.detach().float().cpu().numpy())


def random_scenes(n: int, held_out: bool, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """n scenes drawn uniformly from the seen (or held-out) combinations."""
    pool = combos(held_out)
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]


def vae_ceiling(vae: Any, n: int, size: int, seed: int, latent_noise: float = 0.0) -> dict[str, dict[str, float]]:
    """Judge VAE reconstructions of n fresh draws (seen combinations) and of the held-out ones.

    latent_noise > 0 decodes latent + latent_noise * N(0, I) instead (latents in the model's unit-variance
    units): how much of a denoiser's final error the decoder tolerates (bench/vae_robustness.py).
    """
    from data_pipeline.vae import decode, encode

    rng = np.random.default_rng([EVAL_SEED, seed, 1])
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, scenes in (("seen", random_scenes(n, False, rng)), ("held_out", combos(True) * 4)):
        if not scenes:
            continue
        z = encode(vae, fresh_images(scenes, size, rng))  # (n, C, h, w)
        rec = decode(vae, z + latent_noise * torch.randn(z.shape, generator=g) if latent_noise else z)
        out[name] = score([judge(im) for im in to_uint8(rec)], scenes)
    return out


def text_to_image(model: Any, sp: Any, tok: Any, vae: Any, st: EvalSettings) -> tuple[dict, np.ndarray, list]:
    """Generate one image per prompt (every combination x per_combo), judge; (scores, pixels (N,H,W,3), prompts)."""
    from data_pipeline.vae import decode
    from pretrain.inference.generate import ImageSampling, generate_images

    out, pix, prompts = {}, [], []
    for name in ("seen", "held_out"):
        scenes = combos(name == "held_out") * st.per_combo
        captions = [synthetic.caption_for(*sc) for sc in scenes]
        lat = generate_images(model, [tok.encode(c) for c in captions], sp,
                              ImageSampling(st.steps, st.cfg_scale, st.sampler), seed=st.seed + (name == "held_out"))
        images = to_uint8(decode(vae, lat))
        out[name] = score([judge(im) for im in images], scenes)
        pix.append(images)
        prompts += captions
    return out, np.concatenate(pix), prompts


def image_to_caption(model: Any, sp: Any, tok: Any, vae: Any, st: EvalSettings) -> tuple[dict, list[list[str]]]:
    """Caption fresh draws greedily; word accuracies per split and a few (truth, caption) examples."""
    from data_pipeline.vae import encode
    from pretrain.inference.generate import generate_text

    rng = np.random.default_rng([EVAL_SEED, st.seed, 2])
    size = model.cfg.latent_size * vae.downsample
    out, examples = {}, []
    for name, scenes in (("seen", random_scenes(st.captions, False, rng)), ("held_out", combos(True) * 4)):
        lat = encode(vae, fresh_images(scenes, size, rng))
        ids = generate_text(model, [[] for _ in scenes], sp, 16, images=lat)
        texts = [tok.decode(t) for t in ids]
        out[name] = score_captions(texts, scenes)
        examples += [[synthetic.caption_for(*sc), t] for sc, t in list(zip(scenes, texts))[:4]]
    return out, examples


@torch.no_grad()
def text_loss(model: Any, sp: Any, tok: Any, n_docs: int, seed: int, max_len: int = 128) -> dict[str, float]:
    """Mean next-token loss (nats) and perplexity on n_docs fresh synthetic text documents (BOS doc EOS)."""
    from pretrain.inference.generate import packed_batch
    from contract.batch import IGNORE_INDEX

    rng = np.random.default_rng([EVAL_SEED, seed, 3])
    rows = [[sp.bos_id, *tok.encode(synthetic.text_document(rng))][: max_len - 1] + [sp.eos_id] for _ in range(n_docs)]
    device = next(model.parameters()).device
    C, S = model.cfg.latent_channels, model.cfg.latent_size
    batch = packed_batch(model, rows, torch.zeros(0, C, S, S, device=device),
                         torch.zeros(0, dtype=torch.long, device=device),
                   sp.pad_id)
    targets = torch.full_like(batch.tokens, IGNORE_INDEX)
    for b, r in enumerate(rows):
        targets[b, : len(r) - 1] = torch.tensor(r[1:])
    batch.targets = targets
    out = model(batch)
    loss = float(out.lm_loss_sum) / max(out.num_text_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": out.num_text_tokens}


@torch.no_grad()
def evaluate(model: Any, sp: Any, tok: Any, vae: Any,
             st: EvalSettings | None = None) -> tuple[dict, np.ndarray, list[str]]:
    """The whole evaluation: (report dict, text->image samples (N, H, W, 3) uint8, their prompts).

    Every ZeRO-3 rank must call it with the same arguments: the forwards are collective. `st`'s None
    sampling fields are filled (`resolve_sampling`) and the report's settings hold the values used.
    """
    from pretrain.inference.generate import ImageSampling, resolve_sampling

    st = st or EvalSettings()
    im = resolve_sampling(model, ImageSampling(st.steps, st.cfg_scale, st.sampler))
    st = replace(st, steps=im.steps, cfg_scale=im.cfg_scale, sampler=im.sampler)
    was_training = model.training
    model.eval()
    size = model.cfg.latent_size * vae.downsample
    t2i, pixels, prompts = text_to_image(model, sp, tok, vae, st)
    caps, examples = image_to_caption(model, sp, tok, vae, st)
    report = {
        "settings": asdict(st), "chance": CHANCE,
        "vae": vae_ceiling(vae, st.vae_images, size, st.seed),
        "text_to_image": t2i, "captions": caps, "caption_examples": examples,
        "text": text_loss(model, sp, tok, st.text_docs, st.seed),
    }
    model.train(was_training)
    return report, pixels, prompts


def flat_scalars(report: dict) -> dict[str, float]:
    """The report's accuracies and losses as flat 'eval/<part>/<split>/<metric>' scalars (TensorBoard tags)."""
    out = {}
    for part in ("vae", "text_to_image", "captions"):
        for split, metrics in report[part].items():
            out.update({f"eval/{part}/{split}/{k}": float(v) for k, v in metrics.items() if k != "n"})
    out.update({f"eval/text/{k}": float(v) for k, v in report["text"].items() if k != "tokens"})
    return out


def table(report: dict) -> str:
    """A printable table: rows = what is judged, columns = colour, shape, place, all three, one object (%)."""
    cols = ("color", "shape", "place", "all_three", "one_object")
    lines = [f"{'':28s}" + "".join(f"{c:>11s}" for c in cols) + f"{'n':>6s}"]
    for part in ("vae", "text_to_image", "captions"):
        for split, m in report[part].items():
            cells = "".join(f"{100 * m[c]:10.1f}%" if c in m else f"{'-':>11s}" for c in cols)
            lines.append(f"{part + ' (' + split + ')':28s}{cells}{m['n']:6d}")
    lines.append(f"{'chance':28s}"
                 + "".join(f"{100 * CHANCE[c]:10.1f}%" if c in CHANCE else f"{'-':>11s}" for c in cols))
    t = report["text"]
    lines.append(f"text: loss {t['loss']:.3f} nats/token, perplexity {t['perplexity']:.2f} ({t['tokens']} tokens)")
    return "\n".join(lines)


def save_grid(pixels: np.ndarray, prompts: list[str], path: str | Path, cols: int = 9,
              scale: int | None = None) -> Path:
    """A PNG of samples (N, H, W, 3) uint8 and their prompts.

    When every prompt names a (colour, shape, place) combination (the evaluation's), one sample per
    combination (the first of its `per_combo`): a row per colour and shape, a column per place, labels on
    the edges, held-out combinations framed in red, cells without a sample left light grey. Other prompts:
    each sample over its prompt, `cols` per row. `scale` (default: 64 px cells) enlarges each sample.
    """
    from PIL import Image, ImageDraw

    n, H, W, _ = pixels.shape
    scale = scale or max(1, 64 // max(H, W))
    parsed = [parse_caption(p) for p in prompts]
    if n and all(None not in c for c in parsed):
        return _combination_grid(pixels, parsed, Path(path), scale)
    tw, th = W * scale, H * scale + 24
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * tw, rows * th), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    for i, (img, prompt) in enumerate(zip(pixels, prompts)):
        x, y = (i % cols) * tw, (i // cols) * th
        sheet.paste(Image.fromarray(img).resize((tw, H * scale), Image.NEAREST), (x, y))
        words = prompt.removeprefix("a ").split(" ", 2)
        lines = [" ".join(words[:2]), words[2] if len(words) > 2 else ""]
        for k, line in enumerate(lines):
            draw.text((x + 2, y + H * scale + 1 + 11 * k), line, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _combination_grid(pixels: np.ndarray, scenes: list[tuple], path: Path, scale: int) -> Path:
    """save_grid's layout for the synthetic prompts: rows colour x shape (18), columns place (9)."""
    from PIL import Image, ImageDraw

    _, H, W, _ = pixels.shape
    first: dict[tuple, np.ndarray] = {}
    for img, sc in zip(pixels, scenes):
        first.setdefault(tuple(sc), img)  # (H, W, 3): one sample per combination
    rows = list(itertools.product(synthetic.COLORS, synthetic.SHAPES))
    places = list(synthetic.PLACES)
    cw, ch, gap, left, top = W * scale, H * scale, 4, 96, 28
    sheet = Image.new("RGB", (left + len(places) * (cw + gap), top + len(rows) * (ch + gap)), (110, 110, 110))
    draw = ImageDraw.Draw(sheet)
    draw.rectangle([0, 0, sheet.width, top - 2], fill=(255, 255, 255))
    draw.rectangle([0, 0, left - 2, sheet.height], fill=(255, 255, 255))
    for j, place in enumerate(places):
        x = left + j * (cw + gap)
        for k, word in enumerate(place.split(" ")):
            draw.text((x + 2, 2 + 12 * k), word, fill=(0, 0, 0))
    held = set(synthetic.HELD_OUT)
    for i, (color, shape) in enumerate(rows):
        y = top + i * (ch + gap)
        draw.text((4, y + ch // 2 - 6), f"{color} {shape}", fill=(0, 0, 0))
        for j, place in enumerate(places):
            x = left + j * (cw + gap)
            img = first.get((color, shape, place))
            if img is None:
                draw.rectangle([x, y, x + cw - 1, y + ch - 1], fill=(200, 200, 200))
            else:
                sheet.paste(Image.fromarray(img).resize((cw, ch), Image.NEAREST), (x, y))
            if (color, shape, place) in held:
                draw.rectangle([x - 2, y - 2, x + cw + 1, y + ch + 1], outline=(230, 0, 0), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_report(report: dict, pixels: np.ndarray, prompts: list[str], out: str | Path) -> Path:
    """DIR/report.json and DIR/grid.png; returns DIR."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    save_grid(pixels, prompts, out / "grid.png")
    return out


def main(argv: list[str] | None = None) -> dict:
    """CLI: evaluate an export directory; print the table; write report.json and grid.png."""
    from data_pipeline.tokenizer import Tokenizer
    from data_pipeline.vae import load_vae
    from pretrain.inference.generate import ImageSampling, load_exported, resolve_sampling

    ap = argparse.ArgumentParser(prog="python -m pretrain.evaluation.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export directory (pretrain.artifacts.export)")
    ap.add_argument("--out", required=True, help="directory for report.json and grid.png")
    d = EvalSettings()
    ap.add_argument("--per-combo", type=int, default=d.per_combo,
                    help="text->image samples per combination (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=None,
                    help="denoising steps (default: the export's logging.sample_steps, as the trainer's evaluation)")
    ap.add_argument("--sampler", choices=get_args(Sampler), default=None,
                    help="default: the export's logging.sample_sampler, else the objective's own (ddpm, or euler for "
                         "flow)")
    ap.add_argument("--cfg-scale", type=float, default=None,
                    help="classifier-free guidance scale (default: the export's logging.sample_cfg_scale)")
    ap.add_argument("--captions", type=int, default=d.captions, help="fresh images to caption (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed, help="sampling and fresh-draw seed (default: %(default)s)")
    a = ap.parse_args(argv)
    for flag, v in (("--per-combo", a.per_combo), ("--captions", a.captions)):
        if v < 1:
            ap.error(f"{flag} {v}: must be at least 1 (the report scores every part)")
    model, sp, root = load_exported(a.model)
    if not (root / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{root / 'vae'}: the export has no VAE; re-export with --vae DIR")
    try:  # before the slow work: a DDPM sampler for a flow model, or Euler for a DDPM one
        key = "--sampler" if a.sampler else f"{root / 'config.yaml'}: logging.sample_sampler"
        im = resolve_sampling(model, ImageSampling(a.steps, a.cfg_scale, a.sampler), key)  # unset: the export's record
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    st = EvalSettings(per_combo=a.per_combo, steps=im.steps, cfg_scale=im.cfg_scale, sampler=im.sampler,
                      captions=a.captions, seed=a.seed)
    report, pixels, prompts = evaluate(model, sp, Tokenizer(root / "tokenizer.model"), load_vae(root / "vae"), st)
    out = write_report(report, pixels, prompts, a.out)
    print(table(report))
    print(f"report: {out / 'report.json'}, samples: {out / 'grid.png'}")
    return report


if __name__ == "__main__":
    main()
