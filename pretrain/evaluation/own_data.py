"""Evaluate an export on the data it was trained on (any data, not only the synthetic task):
`python -m pretrain.evaluation.own_data --model EXPORT --out DIR [--data DATA/data.yaml]`.

Writes, under `--out`:
- `report.json`: validation loss per stream and overall (LM loss per text target, diffusion loss per
  image, the trainer's definitions: `Transfusion.forward`, one pass over each validation split);
  the caption word recall; the files written;
- `samples/<prompt slug>_000.png` + `samples.jsonl`: an image per prompt (default: the export's
  `logging.sample_prompts`, which `data_pipeline.prepare` takes from the validation captions), with the
  sampler, steps and CFG the export recorded;
- `captions.jsonl`: for validation images (the pairs pack's validation documents, read from the
  precompute output its pack.json names), the reference caption, the generated one and the share of the
  reference's words the generated caption contains (word recall: a crude check, not a judge).

`pretrain.evaluation.evaluate` is the synthetic task's pixel-judged evaluation; this one needs no judge.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = ["caption_recall", "val_loss", "validation_images", "main"]


def _data_config(path: str | Path) -> Any:
    """The `data:` section of a config file (data.yaml, or an export's config.yaml) as a DataConfig."""
    from data_pipeline.config import DataConfig
    from pretrain import configlib

    section = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
    return configlib.load_data(DataConfig, section, path)


@torch.no_grad()
def val_loss(model: Any, data: Any, micro_batch: int = 1, max_batches: int = 200) -> dict[str, float]:
    """Mean LM loss per text target and diffusion loss per image on each validation stream (at most
    `max_batches` micro-batches each) and over all: keys `<name>/lm_loss`, `<name>/diffusion_loss`,
    `lm_loss`, `diffusion_loss`, plus the counts `<name>/sequences`. One process, no workers; micro-batches
    of 1 sequence, so that a small validation split (3 rows) is scored whole rather than dropped."""
    from data_pipeline.loader import build_loader

    m = model.cfg
    sums: dict[str, list[float]] = {}
    for sc in data.val_streams:
        loader = build_loader(replace(data, val_streams=[sc], num_workers=0), split="val", micro_batch_size=micro_batch,
                              seed=0, patch_size=m.patch_size,
                              latent_shape=(m.latent_channels, m.latent_size, m.latent_size),
                              diffusion_steps=m.diffusion_steps)
        s = [0.0, 0.0, 0.0, 0.0, 0.0]  # CE sum, MSE sum, text targets, images, sequences
        for i, b in enumerate(loader):
            if i >= max_batches:
                break
            out = model(b)
            s = [s[0] + float(out.lm_loss_sum), s[1] + float(out.diffusion_loss_sum), s[2] + out.num_text_tokens,
                 s[3] + out.num_images, s[4] + b.tokens.shape[0]]
        sums[sc.name] = s
    rep: dict[str, float] = {}
    for name, (ce, mse, nt, ni, ns) in sums.items():
        rep[f"{name}/sequences"] = ns
        if nt:
            rep[f"{name}/lm_loss"] = ce / nt
        if ni:
            rep[f"{name}/diffusion_loss"] = mse / ni
    tot = [sum(v[k] for v in sums.values()) for k in range(4)]
    if tot[2]:
        rep["lm_loss"] = tot[0] / tot[2]
    if tot[3]:
        rep["diffusion_loss"] = tot[1] / tot[3]
    return rep


def validation_images(data: Any, n: int) -> tuple[torch.Tensor, list[str]]:
    """Latents (n, C, h, w) and captions of the first `n` validation pairs: the documents the pairs pack sent
    to its val split (every `val_every`-th, pack.json's identity), read from the precompute output it
    names. Empty when no stream is a pairs pack made from a local precompute output."""
    from contract import latents as latent_codec
    from data_pipeline.loader import pack_info
    from data_pipeline.pack import read_mds

    for sc in data.val_streams:
        info = pack_info(sc.remote or sc.local) or {}
        ident = info.get("identity") or {}
        if ident.get("kind") != "pairs" or not ident.get("val_every"):
            continue
        every, lats, caps = int(ident["val_every"]), [], []
        for src in ident.get("inputs", []):
            i = 0
            for s in read_mds(src[0]):
                if i % every == every - 1:
                    lats.append(torch.from_numpy(latent_codec.decode(s)[0]))
                    caps.append(" ".join(seg["text"] for seg in s["doc"] if "text" in seg))
                i += 1
                if len(caps) >= n:
                    return torch.stack(lats), caps
        if caps:
            return torch.stack(lats), caps
    return torch.zeros(0), []


def caption_recall(reference: str, generated: str) -> float:
    """Share of the reference caption's distinct words (lower-cased, letters and digits) found in the generated one."""
    words = lambda t: set(re.findall(r"[a-z0-9]+", t.lower()))  # noqa: E731
    ref = words(reference)
    return len(ref & words(generated)) / len(ref) if ref else 0.0


def main(argv: list[str] | None = None) -> dict:
    """CLI: validation loss, samples and captions of an export on its data (see the module doc)."""
    from data_pipeline.tokenizer import Tokenizer
    from data_pipeline.vae import decode, load_vae
    from pretrain.inference.generate import generate_images, generate_text, load_exported, sample_names, save_pngs

    ap = argparse.ArgumentParser(prog="python -m pretrain.evaluation.own_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export directory (pretrain.artifacts.export)")
    ap.add_argument("--out", required=True, help="directory for report.json, samples/, samples.jsonl, captions.jsonl")
    ap.add_argument("--data", default=None,
                    help="data.yaml whose validation streams to score (default: the export's config)")
    ap.add_argument("--prompt", nargs="*", default=None, help="prompts (default: the export's logging.sample_prompts)")
    ap.add_argument("--captions", type=int, default=16, help="validation images to caption (default: 16)")
    ap.add_argument("--val-batches", type=int, default=200,
                    help="sequences per validation stream at most (default: 200)")
    ap.add_argument("--seed", type=int, default=0, help="(default: 0)")
    a = ap.parse_args(argv)
    model, sp, root = load_exported(a.model)
    model.eval()
    cfg_path = Path(a.data) if a.data else root / "config.yaml"
    data = _data_config(cfg_path)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(root / "tokenizer.model")
    report: dict[str, Any] = {"model": str(root), "data": str(cfg_path),
                              "val": val_loss(model, data, max_batches=a.val_batches)}
    vae = load_vae(root / "vae") if (root / "vae" / "config.json").is_file() else None
    prompts = a.prompt
    if prompts is None:
        prompts = (yaml.safe_load((root / "config.yaml").read_text()).get("logging") or {}).get("sample_prompts", [])
    if vae is not None and prompts:
        # the export's sampler/steps/CFG
        lat = generate_images(model, [tok.encode(p) for p in prompts], sp, seed=a.seed)
        paths = save_pngs(decode(vae, lat), out / "samples", names=sample_names(prompts, 1))
        with open(out / "samples.jsonl", "w") as f:
            for p, path in zip(prompts, paths):
                f.write(json.dumps({"prompt": p, "image": str(path)}) + "\n")
        report["samples"] = len(paths)
    lats, refs = validation_images(data, a.captions)
    if refs:
        gen = [tok.decode(c) for c in generate_text(model, [[] for _ in refs], sp, 48, images=lats, seed=a.seed)]
        recalls = [caption_recall(r, g) for r, g in zip(refs, gen)]
        with open(out / "captions.jsonl", "w") as f:
            for r, g, s in zip(refs, gen, recalls):
                f.write(json.dumps({"reference": r, "generated": g, "word_recall": round(s, 4)}) + "\n")
        report["captions"] = {"n": len(refs), "word_recall": sum(recalls) / len(recalls)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
