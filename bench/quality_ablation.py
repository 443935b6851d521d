"""Model-quality ablations on the synthetic task: train in one process, evaluate at chosen steps.

    python bench/quality_ablation.py --data demo_out/data --out /tmp/abl/v_lr3e-3 --steps 3000 \
        --eval-at 1000,2000 [--ema 0.995] [--cfg-scale 1.5] [key=value overrides...]

The same model, loader, lr schedule and evaluation (`pretrain.evaluation.evaluate`) as the trainer, with a plain
AdamW loop instead of the DeepSpeed engine (tests/test_train_e2e.py shows the two agree step for step),
so one ablation costs one CPU core. Configs: configs/tiny.yaml, configs/demo.yaml (unless --no-demo),
DATA/data.yaml, then the overrides. Prints the evaluation table at each --eval-at step (and for the EMA
weights when --ema is set) and appends every report to OUT/log.jsonl; docs/quality.md's tables come
from this script.

On a machine without `streaming` (a GPU box with its own image), dump the streams' packed rows once
here (`--dump-rows ROWS.npz`, then exit) and train there with `--rows ROWS.npz --device cuda`: the
same rows, `build_row` and `collate` as the loader, drawn with replacement at the loader's mix
proportions (streaming draws without replacement within an epoch). Evaluation runs on the CPU.

The flow-matching objective: `model.objective=flow logging.sample_sampler=euler`; configs/demo.yaml's
`model.diffusion_prediction: v` is a DDPM switch that flow refuses, so under flow it gives way to `eps`
(printed) unless the overrides set it themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.special_ids import load_special_ids  # noqa: E402
from data_pipeline.loader import build_loader, collate, mix_proportions  # noqa: E402
from data_pipeline.sequence import RowSpec, build_row  # noqa: E402
from data_pipeline.tokenizer import Tokenizer  # noqa: E402
from data_pipeline.vae import load_vae  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.evaluation.evaluate import EvalSettings, evaluate, table, write_report  # noqa: E402
from pretrain.model import Transfusion  # noqa: E402
from pretrain.train.schedule import lr_at  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="demo data directory (holds data.yaml)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-at", default="", help="comma-separated steps to evaluate at (and always the last)")
    ap.add_argument("--ema", type=float, default=0.0, help="also evaluate an EMA of the weights with this decay")
    ap.add_argument("--skip-raw", action="store_true", help="with --ema, evaluate the EMA weights only")
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the config's logging.sample_cfg_scale")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-demo", action="store_true", help="leave out configs/demo.yaml (the paper's recipe)")
    ap.add_argument("--device", default="cpu", help="training device (evaluation stays on the CPU)")
    ap.add_argument("--dump-rows", type=Path, help="write the train streams' packed rows to this .npz and exit")
    ap.add_argument("--rows", type=Path, help="train from a --dump-rows file instead of streaming")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    return ap.parse_args(argv)


def flow_overrides(overrides: list[str]) -> list[str]:
    """The overrides, with model.diffusion_prediction=eps first when they select model.objective=flow without it."""
    if "model.objective=flow" in overrides and not any(o.startswith("model.diffusion_prediction=") for o in overrides):
        print("model.objective=flow: model.diffusion_prediction=eps (demo.yaml's v is a DDPM switch)", flush=True)
        return ["model.diffusion_prediction=eps", *overrides]
    return overrides


def swap(model: torch.nn.Module, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Load `weights` into the model's parameters; return the previous ones."""
    old = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for w, p in zip(weights, model.parameters()):
            p.copy_(w)
    return old


def dump_rows(cfg: object, path: Path) -> None:
    """Every packed row of each train stream, as read by streaming, into one .npz (no pickle)."""
    from streaming import StreamingDataset

    arrays: dict[str, np.ndarray] = {}
    for si, sc in enumerate(cfg.data.streams):
        ds = StreamingDataset(local=sc.local, shuffle=False, batch_size=1)
        for i in range(len(ds)):
            for k, v in ds.get_item(i).items():
                arrays[f"{si}/{i}/{k}"] = np.asarray(v)
        print(f"stream {sc.name}: {len(ds)} rows", flush=True)
    np.savez(path, **arrays)


def memory_batches(cfg: object, path: Path, spec: RowSpec, batch_size: int, seed: int) -> Iterator:
    """Endless micro-batches from a --dump-rows file: stream by the loader's mix proportions, row uniform."""
    z = np.load(path, allow_pickle=False)
    rows: dict[int, dict[int, dict]] = {}
    for key in z.files:
        si, i, k = key.split("/")
        rows.setdefault(int(si), {}).setdefault(int(i), {})[k] = z[key]
    streams = [list(rows[si].values()) for si in sorted(rows)]
    props = mix_proportions(cfg.data.streams, cfg.data.image_position_share)
    p = np.array([x if x is not None else len(s) for x, s in zip(props, streams)], dtype=np.float64)
    rng, n = np.random.default_rng(seed), 0
    while True:
        picks = []
        for si in rng.choice(len(streams), size=batch_size, p=p / p.sum()):
            raw = dict(streams[si][rng.integers(len(streams[si]))])
            raw["n_real"] = int(raw["n_real"])
            picks.append(build_row(raw, spec, seed, 0, n))
            n += 1
        yield collate(picks)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    for k, v in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    files = ["configs/tiny.yaml", *([] if a.no_demo else ["configs/demo.yaml"]), str(a.data / "data.yaml")]
    cfg = load_config(",".join(str(ROOT / f) if not f.startswith("/") else f for f in files),
                      [f"train.steps={a.steps}", "data.num_workers=1", f"data.cache_dir={a.out}/cache",
                       *flow_overrides(a.overrides)])
    if a.dump_rows:
        return dump_rows(cfg, a.dump_rows)
    torch.manual_seed(cfg.train.seed)
    model, m, o = Transfusion(cfg.model), cfg.model, cfg.optim
    if a.rows:
        spec = RowSpec(ids=load_special_ids(cfg.data.tokenizer), seq_len=cfg.data.seq_len, patch_size=m.patch_size,
                       latent_shape=(m.latent_channels, m.latent_size, m.latent_size),
                       diffusion_steps=m.diffusion_steps,
                       caption_first_prob=cfg.data.caption_first_prob, caption_dropout=cfg.data.caption_dropout,
                       image_first_max_timestep=cfg.data.image_first_max_timestep)
        loader = memory_batches(cfg, a.rows, spec, cfg.train.global_batch_size, cfg.train.seed)
    else:
        loader = build_loader(cfg.data, "train", cfg.train.global_batch_size, cfg.train.seed, m.patch_size,
                              (m.latent_channels, m.latent_size, m.latent_size), m.diffusion_steps)
    model.to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    sp, tok, vae = load_special_ids(cfg.data.tokenizer), Tokenizer(cfg.data.tokenizer), load_vae(cfg.data.vae)
    settings = EvalSettings(captions=81, vae_images=81, text_docs=32, steps=cfg.logging.sample_steps,
                            cfg_scale=a.cfg_scale or cfg.logging.sample_cfg_scale, sampler=cfg.logging.sample_sampler)
    eval_at = {int(x) for x in a.eval_at.split(",") if x} | {a.steps}
    a.out.mkdir(parents=True, exist_ok=True)
    ema = [p.detach().clone() for p in model.parameters()] if a.ema else None
    print(f"params {sum(p.numel() for p in model.parameters())}", flush=True)
    t0, it = time.time(), iter(loader)
    with open(a.out / "log.jsonl", "a") as log:
        for step in range(a.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, o, a.steps)
            out = model(next(it).to(a.device))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            opt.step()
            if ema is not None:
                # decay warm-up: tf.train.ExponentialMovingAverage(num_updates)
                d = min(a.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for e, p in zip(ema, model.parameters()):
                        e.lerp_(p.detach(), 1 - d)
            if (step + 1) % 100 == 0:
                print(f"step {step + 1} loss {out.loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
            if step + 1 in eval_at:
                for tag in ("raw", "ema")[int(a.skip_raw and ema is not None):] if ema is not None else ("raw",):
                    saved = swap(model, ema) if tag == "ema" else None
                    rep, pix, prompts = evaluate(model.cpu(), sp, tok, vae, settings)
                    model.to(a.device).train()
                    rep.update(step=step + 1, train_s=time.time() - t0, weights=tag, overrides=a.overrides)
                    write_report(rep, pix, prompts, a.out / f"eval_{step + 1}_{tag}")
                    print(f"== step {step + 1} {tag}\n{table(rep)}", flush=True)
                    log.write(json.dumps(rep) + "\n")
                    log.flush()
                    if saved is not None:
                        swap(model, saved)
    model.cpu()
    torch.save(model.state_dict(), a.out / "model.pt")
    if ema is not None:
        swap(model, ema)
        torch.save(model.state_dict(), a.out / "model_ema.pt")


if __name__ == "__main__":
    main()
