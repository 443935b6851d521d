"""Generation with a KV cache: mixed-modal output, images from captions, captions of images, text.

`generate` is the paper's inference: decode text; on BOI append noise patches, denoise them (DDPM or
DDIM, or Euler for a model.objective=flow model; classifier-free guidance against the dropped context)
against the cached prefix, close with EOI and go on with the clean image in context. `generate_images`
and `generate_text` are its two halves.
Single-device functions over a `Transfusion` model: under ZeRO-3 every rank calls them with the same
prompts and seed, so control flow (and so parameter gathering) is identical everywhere. Layouts follow the
training data: caption-first `BOS caption BOI patches EOI EOS`, dropped caption `BOS BOI patches EOI`,
image-first `BOS BOI patches EOI caption EOS`.

    python -m pretrain.inference.generate --model EXPORT_DIR --prompt "a red circle at the top left" --out samples/
    python -m pretrain.inference.generate --model EXPORT_DIR --caption image.png
    python -m pretrain.inference.generate --model EXPORT_DIR --text "Once upon a time"
    python -m pretrain.inference.generate --model EXPORT_DIR --mixed "A picture of a red circle:" --force-image
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

from contract.batch import IGNORE_INDEX, TransfusionBatch
from contract.special_ids import SpecialIds, load_special_ids
from data_pipeline.images import MIN_SIDE, BadImage, load_image, to_uint8
from data_pipeline.tokenizer import Tokenizer
from data_pipeline.vae import decode, encode, load_vae
from pretrain.config import LoggingConfig
from pretrain.model import CachedChunk, KVCache, Transfusion
from pretrain.model.config import Sampler, check_sampler, default_sampler


TokenSeq = list[int | None]  # one sequence being generated: token ids, None at the patch positions of its image


def packed_batch(model: Transfusion, rows: list[TokenSeq], latents: torch.Tensor, t: torch.Tensor,
                 pad: int) -> TransfusionBatch:
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
        image_ids=image_ids.to(device), positions=positions.to(device), latents=latents,
        noise=torch.zeros_like(latents),
        timesteps=t,
    )


Segment = list[int] | torch.Tensor  # text token ids, or one clean latent image (C, H, W)


@dataclass(frozen=True)
class TextSampling:
    """Next-token choice: greedy at temperature 0, else sampled after top-k, then top-p (nucleus) filtering."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter


@dataclass(frozen=True)
class ImageSampling:
    """How an image is denoised: DDPM ancestral (the paper's) or DDIM, or Euler (objective=flow), with
    classifier-free guidance.

    CFG (Ho & Salimans 2022): eps = eps(x | dropped context) + scale * (eps(x | context) - eps(x | dropped
    context)); the dropped context is `BOS BOI`, as caption dropout shows it in training. scale 1 = off.
    A flow model combines its velocities the same way: v = v_u + scale * (v_c - v_u).
    A field left None takes what the export recorded (its config's logging.sample_steps, sample_cfg_scale,
    sample_sampler: `read_export_record`, kept on the model by `load_exported`), else LoggingConfig's
    defaults; a None sampler is the objective's own (`default_sampler`: ddpm, or euler for flow).
    `resolve_sampling` fills them.
    """

    steps: int | None = None
    cfg_scale: float | None = None
    sampler: Sampler | None = None


LongPrompt = Literal["error", "truncate"]  # what a prompt longer than the trained sequence length gets


class PromptTooLong(ValueError):
    """A prompt plus what is to be generated exceeds the model's trained sequence length (on_long_prompt=error)."""


class PromptTruncated(UserWarning):
    """A prompt was cut from the left to fit the trained sequence length (on_long_prompt=truncate)."""


@dataclass(frozen=True)
class ExportRecord:
    """What an export recorded that generation needs (its config.yaml, written by pretrain.artifacts.export).

    sampling: the sampler, steps and CFG scale of the run's logged samples and evaluation (every field set);
    seq_len: the trained sequence length (data.seq_len); None where unknown (a model not loaded from an export).
    """

    sampling: ImageSampling
    seq_len: int | None


def read_export_record(export_dir: str | Path) -> ExportRecord:
    """The one reader of an export's generation defaults: config.yaml's logging.sample_sampler / sample_steps /
    sample_cfg_scale (LoggingConfig's defaults for keys an older export lacks; a null sampler is the
    objective's own, `default_sampler(model.objective)`) and data.seq_len. Raises FileNotFoundError naming
    the missing config.yaml."""
    import yaml

    path = Path(export_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: point at a directory written by pretrain.artifacts.export")
    saved = yaml.safe_load(path.read_text()) or {}
    lg, d = saved.get("logging") or {}, LoggingConfig()
    objective = (saved.get("model") or {}).get("objective", "ddpm")
    sampler = lg.get("sample_sampler") or default_sampler(objective)
    seq_len = (saved.get("data") or {}).get("seq_len")
    sampling = ImageSampling(int(lg.get("sample_steps", d.sample_steps)),
                             float(lg.get("sample_cfg_scale", d.sample_cfg_scale)), sampler)
    return ExportRecord(sampling, int(seq_len) if seq_len is not None else None)


def export_record(model: Transfusion) -> ExportRecord:
    """The record `load_exported` kept on `model`; for any other model LoggingConfig's sampling defaults (with
    the objective's sampler) and no known sequence length."""
    rec = getattr(model, "export_record", None)
    if rec is not None:
        return rec
    d = LoggingConfig()
    return ExportRecord(ImageSampling(d.sample_steps, d.sample_cfg_scale, default_sampler(model.cfg.objective)), None)


def resolve_sampling(model: Transfusion, image: ImageSampling | None = None, key: str = "sampler") -> ImageSampling:
    """`image` with each None field filled from `export_record(model).sampling`; every field set.

    Raises ValueError naming `key` when the sampler cannot drive model.objective (e.g. ddpm for a flow model).
    """
    base, image = export_record(model).sampling, image or ImageSampling()
    out = ImageSampling(base.steps if image.steps is None else image.steps,
                        base.cfg_scale if image.cfg_scale is None else image.cfg_scale, image.sampler or base.sampler)
    check_sampler(model.cfg.objective, out.sampler, key)
    return out


def _segment_len(seg: Segment, P: int) -> int:
    return P + 2 if isinstance(seg, torch.Tensor) else len(seg)  # an image: BOI, P patches, EOI


def fit_prompts(model: Transfusion, prompts: list[list[Segment]], to_generate: int,
                on_long_prompt: LongPrompt = "error") -> list[list[Segment]]:
    """Prompts checked against the trained sequence length (`export_record(model).seq_len`; unchecked if unknown).

    A row needs 1 (BOS) + its segments (an image: P + 2) + `to_generate` positions (the new tokens, and
    P + 1 per image to be generated). Longer: PromptTooLong naming the limit (`error`), or the prompt is cut
    from the left (`truncate`): the oldest tokens go first, an image in context goes whole, and a
    PromptTruncated warning says how many positions, tokens and images were dropped. Raises PromptTooLong
    in both modes when `to_generate` alone does not fit.
    """
    limit, P = export_record(model).seq_len, model.cfg.patches_per_image
    if limit is None:
        return prompts
    room = limit - 1 - to_generate  # positions the prompt's segments may take
    if room < 0:
        raise PromptTooLong(f"{to_generate} positions to generate (new tokens, and P + 1 = {P + 1} per image) + BOS "
                            f"exceed the model's trained sequence length {limit} (data.seq_len of the export); "
                            "lower --max-new-tokens / --max-images")
    out = []
    for i, prompt in enumerate(prompts):
        n = sum(_segment_len(s, P) for s in prompt)
        if n <= room:
            out.append(prompt)
            continue
        if on_long_prompt != "truncate":
            raise PromptTooLong(f"prompt {i}: 1 + {n} positions + {to_generate} to generate = {1 + n + to_generate} "
                                f"exceed the model's trained sequence length {limit} (data.seq_len of the export); "
                                "shorten the prompt, lower --max-new-tokens, or pass --on-long-prompt truncate "
                                "(on_long_prompt='truncate') to drop its oldest part")
        kept: list[Segment] = []
        left, tokens, images = room, 0, 0
        for seg in reversed(prompt):  # keep the newest segments that fit
            k = _segment_len(seg, P)
            if k <= left:
                kept.insert(0, seg)
                left -= k
            elif isinstance(seg, torch.Tensor) or left == 0:
                left = 0  # an image does not fit whole: it and everything older go
                images += isinstance(seg, torch.Tensor)
                tokens += 0 if isinstance(seg, torch.Tensor) else len(seg)
            else:
                kept.insert(0, list(seg[len(seg) - left:]))
                tokens += len(seg) - left
                left = 0
        warnings.warn(f"prompt {i}: {1 + n + to_generate} positions exceed the model's trained sequence length "
                      f"{limit}; dropped {n - sum(_segment_len(s, P) for s in kept)} positions from the left "
                      f"({tokens} tokens, {images} images)",
                      PromptTruncated, stacklevel=3)
        out.append(kept)
    return out


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), any matching shapes."""
    return uncond + scale * (cond - uncond)


def sample_tokens(logits: torch.Tensor, s: TextSampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): argmax at temperature 0, else a draw from the filtered softmax.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p (Holtzman et al.
    2020), always at least one. Draws use `generator` (CPU), so a seed fixes them.
    """
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    x = logits.float() / s.temperature  # (B, V)
    if s.top_k > 0:
        kth = x.topk(min(s.top_k, x.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_x.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= s.top_p  # mass before this token already reaches top_p
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    ids = torch.multinomial(x.softmax(dim=-1).cpu(), 1, generator=generator)  # (B, 1)
    return ids.squeeze(1).to(logits.device)


def _flatten(prompt: list[Segment], sp: SpecialIds, P: int) -> tuple[TokenSeq, list[torch.Tensor]]:
    """BOS + segments as one row (an image becomes BOI, P patch slots, EOI) and the row's images."""
    row: TokenSeq = [sp.bos_id]
    images = []
    for seg in prompt:
        if isinstance(seg, torch.Tensor):
            row += [sp.boi_id, *([None] * P), sp.eoi_id]
            images.append(seg)
        else:
            row += list(seg)
    return row, images


def prefill(model: Transfusion, cache: KVCache, rows: list[TokenSeq], images: list[torch.Tensor], pad: int) -> None:
    """Append rows to `cache`, left-padded with `pad` to the longest: token ids, None for each patch slot
    of an in-context image; `images` (C, H, W) latents fill the slots in row-major order, clean (t = 0)."""
    L = max(len(r) for r in rows)
    if L == 0:
        return
    device = cache.k.device
    B, P = len(rows), model.cfg.patches_per_image
    tokens = torch.full((B, L), pad, dtype=torch.long)
    image_ids = torch.full((B, L), -1, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    n = 0
    for b, row in enumerate(rows):
        off, k = L - len(row), 0
        valid[b, off:] = True
        for i, tok in enumerate(row):
            if tok is None:
                image_ids[b, off + i] = n + k // P
                k += 1
            else:
                tokens[b, off + i] = tok
        n += k // P
    x0 = torch.stack(images).to(device) if images else None
    t = torch.zeros(n, dtype=torch.long, device=device)  # clean images in context: t = 0
    model.forward_cached(cache, CachedChunk(tokens.to(device), image_ids.to(device), valid.to(device), x0,
                                            t if n else None))


def new_cache(model: Transfusion, batch_size: int) -> KVCache:
    """An empty KV cache of `batch_size` rows on the model's device and dtype."""
    p = next(model.parameters())
    return KVCache(model.cfg, batch_size, p.device, p.dtype)


def _denoise(model: Transfusion, cache: KVCache, rows: list[int], im: ImageSampling, sp: SpecialIds,
             g: torch.Generator) -> torch.Tensor:
    """Latents (m, C, H, W) for the cache rows that end in BOI: the prefix is cached, each step runs P patches.
    `im`'s None fields take the export's record (`resolve_sampling`)."""
    im = resolve_sampling(model, im)
    cfg = model.cfg
    m, P, device = len(rows), cfg.patches_per_image, cache.k.device
    noise = torch.randn(m, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g).to(device)
    ctx = cache.select(rows)
    if im.cfg_scale != 1.0:
        uncond = new_cache(model, m)
        prefill(model, uncond, [[sp.bos_id, sp.boi_id]] * m, [], sp.pad_id)
        ctx = KVCache.concat([ctx, uncond])
    k = ctx.batch_size // m  # 1, or 2 with guidance (cond rows, then uncond rows)
    tokens = torch.full((k * m, P), sp.pad_id, dtype=torch.long, device=device)
    image_ids = torch.arange(k * m, device=device)[:, None].expand(k * m, P)  # (k*m, P)
    valid = torch.ones(k * m, P, dtype=torch.bool, device=device)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xs, ts = x.repeat(k, 1, 1, 1), t.repeat(k)  # (k*m, C, H, W)
        # (k*m, C, H, W)
        _, eps = model.forward_cached(ctx, CachedChunk(tokens, image_ids, valid, xs, ts), commit=False)
        return eps if k == 1 else cfg_combine(*eps.chunk(2), im.cfg_scale)

    return model.sample_latents(eps_fn, noise, im.steps, im.sampler, generator=g)  # eps_fn: eps or velocity


@torch.no_grad()
def generate_images(
    model: Transfusion,
    prompts: list[list[int]],
    sp: SpecialIds,
    image: ImageSampling = ImageSampling(),
    seed: int = 0,
    on_long_prompt: LongPrompt = "error",
) -> torch.Tensor:
    """Latents (N, C, H, W) for N tokenised captions (without BOS), CFG against the dropped caption.

    `image`'s None fields (steps, cfg_scale, sampler): what the export recorded (`resolve_sampling`), the
    sampler being the objective's own unless recorded; ValueError when the sampler does not fit
    model.objective. A caption longer than the trained length allows (with BOI and the P patches):
    PromptTooLong, or cut from the left with a warning (`fit_prompts`, `on_long_prompt`).

    The prefix `BOS caption BOI` is computed once (KV cache); each denoising step runs the patches only.
    """
    P = model.cfg.patches_per_image
    prompts = [p[0] if p else [] for p in fit_prompts(model, [[list(p)] for p in prompts], 1 + P, on_long_prompt)]
    cache = new_cache(model, len(prompts))
    prefill(model, cache, [[sp.bos_id, *p, sp.boi_id] for p in prompts], [], sp.pad_id)
    g = torch.Generator().manual_seed(seed)
    return _denoise(model, cache, list(range(len(prompts))), image, sp, g)


@dataclass
class _RowState:
    """One prompt's decoding state in `generate` (one object per row, not parallel lists)."""

    pending: int  # the next token to feed
    opens: bool  # the row's next step makes an image (pending is BOI and images are allowed)
    active: bool = True  # still decoding
    new_tokens: int = 0  # tokens drawn so far (BOI included)
    images: int = 0  # images made so far
    out: list[Segment] = field(default_factory=list)  # the generated segments (prompt omitted)


@torch.no_grad()
def generate(
    model: Transfusion,
    prompts: list[list[Segment]],
    sp: SpecialIds,
    max_new_tokens: int = 64,
    max_images: int = 1,
    text: TextSampling = TextSampling(),
    image: ImageSampling = ImageSampling(),
    seed: int = 0,
    on_long_prompt: LongPrompt = "error",
) -> list[list[Segment]]:
    """Mixed-modal generation (the paper's inference): interleaved text ids and latents (C, H, W) per prompt.

    Each prompt is a list of segments (token ids without BOS; clean latents) and may end in BOI to
    force an image. Text is decoded token by token with a KV cache; when a row's next token is BOI,
    noise patches are appended and denoised against the cached prefix, the clean image (t = 0) and
    EOI join the context, and decoding goes on. A row stops at EOS (not returned) or after
    max_new_tokens new tokens (BOI included). After max_images images a row's BOI logit is masked; max_images=0
    means text only, BOI then being an ordinary token. Prompts of any lengths are batched (left-padded).
    The output omits the prompt. Same inputs and seed give the same output. `image`'s None fields take
    the export's record (`resolve_sampling`). A prompt that with max_new_tokens and max_images x (P + 1)
    exceeds the trained sequence length is PromptTooLong, or cut from the left with a PromptTruncated
    warning (`on_long_prompt`, `fit_prompts`).
    """
    prompts = fit_prompts(model, prompts, max_new_tokens + max_images * (model.cfg.patches_per_image + 1),
                          on_long_prompt)
    P = model.cfg.patches_per_image
    flat = [_flatten(p, sp, P) for p in prompts]
    B = len(flat)
    device = next(model.parameters()).device
    cache = new_cache(model, B)
    prefill(model, cache, [r[:-1] for r, _ in flat], [x for _, imgs in flat for x in imgs], sp.pad_id)
    rows = [_RowState(pending=r[-1], opens=r[-1] == sp.boi_id and max_images > 0) for r, _ in flat]
    for r in rows:
        r.active = max_new_tokens > 0 or r.opens
    g = torch.Generator().manual_seed(seed)
    while any(r.active for r in rows):
        feed = torch.tensor([[r.pending if r.active else sp.pad_id] for r in rows], device=device)  # (B, 1)
        valid = torch.tensor([[r.active] for r in rows], device=device)  # (B, 1)
        h, _ = model.forward_cached(cache, CachedChunk(feed, torch.full_like(feed, -1), valid))  # (B, 1, D)
        logits = model.lm_logits(h[:, -1]).float()  # (B, V)
        makes = [b for b, r in enumerate(rows) if r.active and r.opens]
        draw = [b for b, r in enumerate(rows) if r.active and not r.opens]
        if makes:
            lat = _denoise(model, cache, makes, image, sp, g)  # (m, C, H, W)
            _commit_images(model, cache, makes, lat, sp.pad_id)
            for b, x in zip(makes, lat):
                r = rows[b]
                r.out.append(x)
                r.images += 1
                r.pending, r.opens, r.active = sp.eoi_id, False, r.new_tokens < max_new_tokens
        if max_images > 0:
            logits[[b for b, r in enumerate(rows) if r.images >= max_images], sp.boi_id] = float("-inf")
        ids = sample_tokens(logits, text, g).tolist()
        for b in draw:
            r, tok = rows[b], ids[b]
            r.new_tokens += 1
            r.pending, r.opens = tok, tok == sp.boi_id and max_images > 0
            r.active = tok != sp.eos_id and (r.new_tokens < max_new_tokens or r.opens)
            if tok != sp.eos_id and not r.opens:
                if not r.out or isinstance(r.out[-1], torch.Tensor):
                    r.out.append([])
                r.out[-1].append(tok)
    return [r.out for r in rows]


def _commit_images(model: Transfusion, cache: KVCache, rows: list[int], latents: torch.Tensor, pad: int) -> None:
    """Append clean latents (m, C, H, W) at t = 0 as P patch slots of `rows`; other rows get invalid slots."""
    B, P, device = cache.batch_size, model.cfg.patches_per_image, cache.k.device
    image_ids = torch.full((B, P), -1, dtype=torch.long, device=device)
    valid = torch.zeros(B, P, dtype=torch.bool, device=device)
    for i, b in enumerate(rows):
        image_ids[b], valid[b] = i, True
    tokens = torch.full((B, P), pad, dtype=torch.long, device=device)
    t = torch.zeros(len(rows), dtype=torch.long, device=device)
    model.forward_cached(cache, CachedChunk(tokens, image_ids, valid, latents, t))


@torch.no_grad()
def generate_text(
    model: Transfusion,
    prompts: list[list[int]],
    sp: SpecialIds,
    max_new_tokens: int = 32,
    images: torch.Tensor | None = None,
    text: TextSampling = TextSampling(),
    seed: int = 0,
    on_long_prompt: LongPrompt = "error",
) -> list[list[int]]:
    """Continuations (greedy by default) of each prompt; with `images` (N, C, H, W) each prompt follows
    `BOS BOI image EOI`. Stops at EOS (not returned) or max_new_tokens; no images are generated.
    Prompts too long for the trained sequence length: see `generate`'s `on_long_prompt`."""
    if not prompts:
        return []
    segs = [[p] if images is None else [images[i], p] for i, p in enumerate(prompts)]
    outs = generate(model, segs, sp, max_new_tokens, max_images=0, text=text, seed=seed, on_long_prompt=on_long_prompt)
    return [[tok for seg in o for tok in seg] for o in outs]


def load_exported(path: str | Path, device: str = "cpu") -> tuple[Transfusion, SpecialIds, Path]:
    """Model (`Transfusion.from_pretrained`), special ids and the export directory of `pretrain.artifacts.export`
    output.

    The model carries the export's `ExportRecord` (`model.export_record`: sampling defaults and trained
    sequence length), which the generation functions use for arguments left None.
    Raises FileNotFoundError naming a missing file.
    """
    root = Path(path)
    for name in ("config.yaml", "tokenizer.json"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} missing: point --model at a directory written by "
                                    f"pretrain.artifacts.export")
    model = Transfusion.from_pretrained(root, device=device)
    model.export_record = read_export_record(root)
    return model, load_special_ids(root / "tokenizer.json"), root


def main(argv: list[str] | None = None) -> None:
    """CLI: images from prompts (PNG), captions of images, text continuations, mixed-modal generation.

    Bad input (missing export files, an unreadable or too small image, a sampler that does not fit the
    model, a prompt longer than the trained sequence length) exits with a message, no traceback.
    """
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (FileNotFoundError, BadInput, PromptTooLong) as e:
        raise SystemExit(f"error: {e}") from None


class BadInput(ValueError):
    """A user-supplied file that generation cannot use; the message names the file and what to do."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export directory (pretrain.artifacts.export)")
    ap.add_argument("--prompt", action="append", default=[], help="caption to draw (repeatable)")
    ap.add_argument("--caption", action="append", default=[], help="PNG/JPEG image to caption (repeatable)")
    ap.add_argument("--text", action="append", default=[], help="text prompt to continue (repeatable)")
    ap.add_argument("--mixed", action="append", default=[],
                    help="prompt for mixed-modal generation: text, and an image wherever the model emits BOI "
                         "(repeatable)")
    ap.add_argument("--force-image", action="store_true",
                    help="--mixed: end each prompt with BOI (an image comes first)")
    ap.add_argument("--max-images", type=int, default=1, help="--mixed: images per prompt at most (default: 1)")
    ap.add_argument("--num-samples", type=int, default=1, metavar="N",
                    help="samples per prompt (default: 1); images are written as <prompt slug>_<k>.png")
    ap.add_argument("--out", default="samples", help="directory for generated PNGs (default: samples)")
    ap.add_argument("--sampler", choices=get_args(Sampler), default=None,
                    help="ancestral DDPM (paper) or DDIM for model.objective=ddpm; Euler (ODE) or euler_ancestral "
                         "(stochastic) for flow (default: the export's logging.sample_sampler, else the objective's "
                         "own)")
    ap.add_argument("--steps", type=int, default=None,
                    help="denoising steps (default: the export's logging.sample_steps)")
    ap.add_argument("--cfg-scale", type=float, default=None,
                    help="classifier-free guidance scale, 1 = off (default: the export's logging.sample_cfg_scale)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="new tokens per prompt at most (default: 48)")
    ap.add_argument("--on-long-prompt", choices=get_args(LongPrompt), default="error",
                    help="a prompt that, with what is to be generated, exceeds the trained sequence length (the "
                         "export's data.seq_len): stop with an error, or drop its oldest part with a warning (default: "
                         "error)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (paper; default)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all; default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off; default)")
    ap.add_argument("--seed", type=int, default=0, help="default: 0")
    ap.add_argument("--animated-frame", type=int, default=None, metavar="K",
                    help="--caption of an animated GIF/WebP/APNG: caption frame K (0-based, composited); "
                         "default: refuse it")
    return ap


def slug(text: str, max_len: int = 60) -> str:
    """A file-name piece that says the prompt: lower-case letters and digits joined by '-', at most max_len."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-") or "prompt"


def sample_names(prompts: list[str], n: int) -> list[str]:
    """File stems `<slug>_<k>` for n samples of each prompt, in prompt-major order; a slug another prompt
    already has gets `-2`, `-3`, ... so no file overwrites another."""
    seen: dict[str, int] = {}
    names = []
    for p in prompts:
        base = slug(p)
        seen[base] = seen.get(base, 0) + 1
        stem = base if seen[base] == 1 else f"{base}-{seen[base]}"
        names += [f"{stem}_{k:03d}" for k in range(n)]
    return names


def _run(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise BadInput(f"--num-samples {args.num_samples}: must be at least 1")
    model, sp, root = load_exported(args.model)
    try:  # before the slow work: a DDPM sampler for a flow model, or Euler for DDPM
        key = "--sampler" if args.sampler else f"{root / 'config.yaml'}: logging.sample_sampler"
        image = resolve_sampling(model, ImageSampling(args.steps, args.cfg_scale, args.sampler), key)
    except ValueError as e:
        raise BadInput(str(e)) from None
    tok = Tokenizer(root / "tokenizer.model")
    n, P = args.num_samples, model.cfg.patches_per_image
    texts = {"prompt": [tok.encode(p) for p in args.prompt], "text": [tok.encode(p) for p in args.text],
             "mixed": [tok.encode(p) + ([sp.boi_id] if args.force_image else []) for p in args.mixed]}
    if args.on_long_prompt == "error":  # every prompt checked before the slow work
        fit_prompts(model, [[t] for t in texts["prompt"]], 1 + P)
        fit_prompts(model, [[t] for t in texts["text"]], args.max_new_tokens)
        fit_prompts(model, [[t] for t in texts["mixed"]], args.max_new_tokens + args.max_images * (P + 1))
        fit_prompts(model, [[torch.empty(0), []] for _ in args.caption], args.max_new_tokens)
    print(f"sampling: {image.sampler}, {image.steps} steps, CFG {image.cfg_scale}"
          f"{'' if args.sampler and args.steps and args.cfg_scale else ' (unset flags: as the export recorded)'}",
          file=sys.stderr)
    vae = load_vae(root / "vae")
    text = TextSampling(args.temperature, args.top_k, args.top_p)
    pixels = None
    if args.caption:  # read every input before the slow work starts
        pixels = _read_images(args.caption, model.cfg.latent_size * vae.downsample, args.animated_frame)
    kw = {"seed": args.seed, "on_long_prompt": args.on_long_prompt}
    if args.prompt:
        lat = generate_images(model, [t for t in texts["prompt"] for _ in range(n)], sp, image, **kw)
        paths = save_pngs(decode(vae, lat), args.out, names=sample_names(args.prompt, n))
        for i, path in enumerate(paths):
            print(f"{args.prompt[i // n]!r} -> {path}")
    if pixels is not None:
        ids = generate_text(model, [[] for _ in args.caption for _ in range(n)], sp, args.max_new_tokens,
                            encode(vae, pixels).repeat_interleave(n, 0), text, **kw)
        for i, c in enumerate(ids):
            print(f"{args.caption[i // n]}{f' [{i % n}]' if n > 1 else ''} -> {tok.decode(c)!r}")
    if args.text:
        ids = generate_text(model, [t for t in texts["text"] for _ in range(n)], sp, args.max_new_tokens, None, text,
                            **kw)
        for i, c in enumerate(ids):
            print(f"{args.text[i // n]!r}{f' [{i % n}]' if n > 1 else ''} -> {tok.decode(c)!r}")
    if args.mixed:
        prompts = [[t] for t in texts["mixed"] for _ in range(n)]
        outs = generate(model, prompts, sp, args.max_new_tokens, args.max_images, text, image, **kw)
        for i, (name, out) in enumerate(zip(sample_names(args.mixed, n), outs)):
            print(f"{args.mixed[i // n]!r} -> {_describe(out, tok, vae, decode, Path(args.out), name)}")


def _describe(out: list[Segment], tok: object, vae: object, decode: object, dir: Path, stem: str) -> list[str]:
    """Text segments decoded, images written as PNGs `<stem>_img<j>.png` (named by their path) for one mixed-modal
    output."""
    parts = []
    for j, seg in enumerate(out):
        if isinstance(seg, torch.Tensor):
            parts.append(str(save_pngs(decode(vae, seg[None]), dir, names=[f"{stem}_img{j:02d}"])[0]))
        else:
            parts.append(tok.decode(seg))
    return parts


def _read_images(paths: list[str], size: int, animated_frame: int | None = None) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1] from image files (`load_image`: EXIF orientation, ICC profile to sRGB;
    animated ones only with `animated_frame`); BadInput names the file and the problem."""
    out = []
    for p in paths:
        try:
            out.append(load_image(Path(p).read_bytes(), size, animated_frame))
        except OSError as e:
            raise BadInput(f"--caption {p}: cannot read the file ({e.strerror or e})") from None
        except BadImage as e:
            raise BadInput(f"--caption {p}: not a usable image ({e}); pass a PNG or JPEG of at least "
                           f"{MIN_SIDE}x{MIN_SIDE} px") from None
    return torch.from_numpy(np.stack(out))


def save_pngs(pixels: torch.Tensor, out: str | Path, prefix: str = "", names: list[str] | None = None) -> list[Path]:
    """Write (N, 3, H, W) images in [-1, 1] as PNG files `<names[i]>.png` (default `<prefix><i>.png`); returns their
    paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(pixels):
        path = out / (f"{names[i]}.png" if names is not None else f"{prefix}{i:03d}.png")
        Image.fromarray(to_uint8(img.cpu().numpy())).save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
