"""The 0.16B config with U-Net patching trains at 4096 positions under ZeRO-3 on 2 CPU ranks; peak RSS per
rank measured against pretrain.plan.estimate's host-memory prediction for the same shape.

    python bench/scale_016b.py [--steps 3] [--images 2] [--lr 5e-4] [--out DIR] [--json FILE]
    python bench/scale_016b.py --one-device [--steps 20] [--timers events,sync]   # one GPU (docs/gpu.md)

--one-device: the same data and config trained by one rank on this machine's device: on a GPU bf16 with
NCCL, no activation checkpointing, micro-batch 2 (global batch 2); without CUDA fp32 with gloo (the
rehearsal of bench/gpu_session.sh). Per step from metrics.jsonl: step time (the timer's phases), the
share of it spent waiting for data, text tokens/s and the trainer's MFU (datasheet peak; GPU only); then
medians over the steps after the first 3 (compilation, warm-up). One launch per --timers entry
(logging.timer): the step time of each, and its ratio to the first. No memory prediction in this mode.

1. Data: 2 packed rows of 4096 positions, each holding `--images` caption+image documents (256-patch
   images: 8x32x32 latents, patch 2) and a text document filling the rest, packed by the data pipeline's
   own Packer and written as real MDS shards with pack.json (data_pipeline.pack.pack_split). The latents
   are N(0, 1) draws standing in for a VAE's (no VAE is trained); the text uses a 512-token alphabet of
   the 32,003-id vocabulary so the LM loss falls visibly in a few steps. Global batch 2 = micro-batch 1 x
   2 ranks: every step trains on the same two rows (fresh noise and timesteps each epoch, as the loader
   draws them).
2. Baseline: one process imports the trainer, DeepSpeed's CPU Adam and streaming, and runs the model's
   compiled FlexAttention once on a tiny batch: its peak RSS is the runtime floor of a rank.
3. Training: `torchrun --nproc_per_node 2 -m pretrain.train` with configs/transfusion_0.16b.yaml plus
   model.patch_encoder=unet, fp32, ZeRO-3 (gloo), activation checkpointing, micro-batch 1. Every rank's
   VmHWM and VmRSS (/proc/PID/status) are polled; the peak before the final checkpoint save is the one
   compared (the save is reported beside it).
4. Partitions: each rank's ZeRO-3 optimizer-state file holds its fp32 parameter partition; their sizes
   are compared with total parameters / 2.
5. Prediction: pretrain.plan.estimate.host_memory_plan for the same config, data mix (the shards' pack.json),
   DeepSpeed config and baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.dist_env import free_port  # noqa: E402
from contract.special_ids import SpecialIds, save_special_ids  # noqa: E402
from data_pipeline.pack import pack_split  # noqa: E402
from data_pipeline.packer import PAIR, TEXT, Packer, Unit  # noqa: E402
from pretrain.plan.hardware import GIB  # noqa: E402

SEQ, C, S, PATCH = 4096, 8, 32, 2
P = (S // PATCH) ** 2  # 256 patches per image
IDS = SpecialIds(vocab_size=32003, bos_id=1, eos_id=2, boi_id=32000, eoi_id=32001, pad_id=32002)
ALPHABET = 512  # text token ids 10..521
CAPTION = 40
ROWS = 2
MIN_FREE = 1 * GIB  # the run is stopped when the machine has less memory available than this
#: DeepSpeed knobs of this run (smaller than DeepSpeed's defaults so two ranks fit beside other jobs on a
#: 24 GiB machine); the estimate reads the same derived config.
DS_ZERO = {"reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 20_000_000,
           "stage3_max_live_parameters": 100_000_000}


def _docs(rows: int, images: int, rng: np.random.Generator):
    """Per row: `images` caption+image pairs, then one text document that fills the row exactly."""
    text_len = SEQ - images * (CAPTION + P + 4) - 2  # a pair takes caption + BOS/EOS + BOI + P + EOI
    for _ in range(rows):
        for _ in range(images):
            lat = rng.standard_normal((C, S, S), dtype=np.float32).astype(np.float16)
            yield [Unit(PAIR, rng.integers(10, 10 + ALPHABET, CAPTION).tolist(), lat)]
        yield [Unit(TEXT, [IDS.bos_id, *rng.integers(10, 10 + ALPHABET, text_len).tolist(), IDS.eos_id])]


def build_data(root: Path, images: int, seed: int = 0) -> dict:
    """Tokenizer metadata + one packed stream at root/mix/train; returns its pack statistics."""
    save_special_ids(IDS, root / "tok.model")
    meta = {"kind": "interleaved", "seq_len": SEQ, "patch_size": PATCH, "latent_shape": [C, S, S], "dtype": "fp16"}
    out = root / "mix" / "train"
    stats = pack_split(Packer(SEQ, P, lookahead=4), _docs(ROWS, images, np.random.default_rng(seed)), out, meta,
                       1 << 26)
    if stats["rows"] != ROWS or stats["images"] != ROWS * images:
        raise RuntimeError(f"packing gave {stats['rows']} rows / {stats['images']} images, wanted {ROWS} / "
                           f"{ROWS * images}: {stats}")
    return stats


def overrides(root: Path, steps: int, lr: float, patch_encoder: str = "unet") -> list[str]:
    """The run: 0.16B + U-Net patching, fp32 ZeRO-3 on gloo, checkpointing, micro-batch 1 x 2 ranks."""
    ds = json.dumps({"zero_optimization": DS_ZERO}).replace('"', "")
    stream = f"[{{name: mix, local: {root / 'mix' / 'train'}}}]"
    return [
        f"model.patch_encoder={patch_encoder}", f"data.tokenizer={root / 'tok.model'}", f"data.streams={stream}",
        "data.val_streams=[]", "data.num_workers=0", f"data.cache_dir={root / 'cache'}",
        f"train.steps={steps}", "train.global_batch_size=2", "train.micro_batch_size=1", "train.precision=fp32",
        "train.activation_checkpointing=true", f"train.run_dir={root / 'run'}",
        f"optim.lr={lr}", f"optim.min_lr={lr}", "optim.warmup_steps=0",
        "checkpoint.every=0", "logging.every=1", "logging.val_every=0", "logging.sample_every=0",
        "logging.eval_every=0", "logging.tensorboard=false", "distributed.backend=gloo",
        "distributed.zero_stage=3", f"distributed.deepspeed={ds}",
    ]


BASELINE = r"""
import sys
import torch, streaming, deepspeed, pretrain.train  # what a rank imports
from deepspeed.ops.adam import DeepSpeedCPUAdam
from pretrain.model import ModelConfig, Transfusion
sys.path.insert(0, sys.argv[1])
from gpu_step import packed_batch
DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(4))])  # loads the JIT-built op
cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64, latent_size=4, patch_size=2, attention="flex")
Transfusion(cfg)(packed_batch(cfg, 1, 64, 1, caption=4)).loss.backward()  # compiled FlexAttention + block mask
print(int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024)
"""


def measure_baseline(env: dict) -> int:
    """Peak RSS (bytes) of one process that loads what a rank loads and runs one tiny compiled step."""
    r = subprocess.run([sys.executable, "-c", BASELINE, str(ROOT / "bench")], env=env, capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"baseline process failed:\n{r.stderr[-3000:]}")
    return int(r.stdout.strip().splitlines()[-1])


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def train_and_watch(root: Path, cfg_args: list[str], env: dict, timeout: float) -> dict:
    """Run the trainer on 2 ranks, polling each rank's VmHWM; returns peaks, log and wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "pretrain.train", *cfg_args]
    log_path = root / "train.log"
    t0 = time.time()
    ranks: dict[int, int] = {}  # rank -> pid
    peak_train = {0: 0, 1: 0}  # VmHWM before the final checkpoint exists
    peak_all = {0: 0, 1: 0}
    per_step: list[dict[int, int]] = []
    ckpt_root = root / "run" / "checkpoints"
    metrics = root / "run" / "metrics.jsonl"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if time.time() - t0 > timeout or psutil.virtual_memory().available < MIN_FREE:
                for pid in ranks.values():  # SIGKILL: SIGTERM would make the trainer save a checkpoint first
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
                proc.kill()
                raise RuntimeError(f"stopped after {time.time() - t0:.0f} s (timeout {timeout:.0f} s, or under "
                                   f"{MIN_FREE / GIB:.0f} GiB of memory left on the machine); log: {log_path}")
            if len(ranks) < 2:
                for ch in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if "pretrain.train" in " ".join(ch.cmdline()):
                            ranks[int(ch.environ()["RANK"])] = ch.pid
                    except (psutil.Error, KeyError):
                        pass
            saving = ckpt_root.exists() and any(ckpt_root.iterdir())
            for r, pid in ranks.items():
                try:
                    hwm = _status(pid)["VmHWM"]
                except (OSError, KeyError):
                    continue
                peak_all[r] = max(peak_all[r], hwm)
                if not saving:
                    peak_train[r] = max(peak_train[r], hwm)
            n = sum(1 for _ in open(metrics)) if metrics.exists() else 0
            while len(per_step) < n:
                per_step.append(dict(peak_train))
            time.sleep(0.25)
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"trainer exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
    return {"peak_train": peak_train, "peak_all": peak_all, "per_step": per_step, "wall_s": wall,
            "log": str(log_path)}


def partition_sizes(root: Path) -> dict[int, int]:
    """fp32 elements of each rank's parameter partition, from its ZeRO-3 optimizer-state file."""
    import torch

    out = {}
    for f in sorted((root / "run" / "checkpoints").glob("*/*zero_pp_rank_*_optim_states.pt")):
        rank = int(f.name.split("zero_pp_rank_")[1].split("_")[0])
        sd = torch.load(f, map_location="cpu", weights_only=False)  # written by this run, not a user's file
        flat = sd["optimizer_state_dict"]["fp32_flat_groups"]
        out[rank] = sum(int(t.numel()) for t in flat)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", type=int, default=2, help="256-patch images per 4096-position row")
    ap.add_argument("--lr", type=float, default=5e-4, help="constant learning rate (no warm-up)")
    ap.add_argument("--patch-encoder", default="unet", choices=["unet", "linear"],
                    help="unet: the paper's U-Net patching (0.44B parameters in all); linear: the config's default")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--one-device", action="store_true",
                    help="one rank on this machine's device (GPU: bf16 + NCCL; CPU: fp32 + gloo): step time, data "
                    "share, MFU")
    ap.add_argument("--timers", default="events",
                    help="--one-device: comma-separated logging.timer values, one launch each (events, sync)")
    ap.add_argument("extra", nargs="*", help="more config overrides (key=value), e.g. model.n_layers=2 for a quick "
                    "check of the plumbing; the figures then are not the 0.16B's")
    a = ap.parse_args(argv)
    if a.out:
        return run(Path(a.out), a)
    with tempfile.TemporaryDirectory(prefix="scale_016b_") as tmp:
        return run(Path(tmp), a)


def run(root: Path, a: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.plan.batch import derive_ds_config, plan_batch
    from pretrain.plan.estimate import host_memory_plan, mix_for

    root.mkdir(parents=True, exist_ok=True)
    if a.one_device:
        return run_one_device(root, a)
    # this interpreter's bin first on PATH: DeepSpeed JIT-builds its CPU ops with the first `ninja` found,
    # and another ninja rebuilds them at every launch (tests/conftest.py says why)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1", PATH=path)
    print(f"load average {os.getloadavg()[0]:.1f}; available memory {psutil.virtual_memory().available / GIB:.1f} GiB")
    stats = build_data(root, a.images)
    cfg_args = ["--config", str(ROOT / "configs" / "transfusion_0.16b.yaml"),
                *overrides(root, a.steps, a.lr, a.patch_encoder),
                *a.extra]
    cfg = load_config(cfg_args[1], cfg_args[2:])
    ds = derive_ds_config(cfg, plan_batch(cfg, 2), on_gpu=False)
    baseline = measure_baseline(env)
    plan = host_memory_plan(cfg, mix_for(cfg), world_size=2, ds_config=ds, baseline_bytes=baseline)
    need, avail = 2 * plan.total, psutil.virtual_memory().available
    if need > avail:
        raise MemoryError(f"2 ranks need about {need / GIB:.1f} GiB (pretrain.plan.estimate), {avail / GIB:.1f} GiB is "
                          "available: stop other jobs first (or pass --images 1)")
    res = train_and_watch(root, cfg_args, env, a.timeout)
    losses = [json.loads(line) for line in open(root / "run" / "metrics.jsonl") if '"loss"' in line]
    parts = partition_sizes(root)
    total = plan.counts["total"]
    predicted = plan.total

    print(f"0.16B + {a.patch_encoder} patching{' with ' + ' '.join(a.extra) if a.extra else ''}: {total:,} parameters; "
          f"{ROWS} rows x {SEQ} positions, {a.images} images of "
          f"{P} patches per row ({stats['image_positions'] / stats['positions']:.1%} image positions); fp32, ZeRO-3, "
          f"2 ranks (gloo), activation checkpointing, micro-batch 1; {a.steps} steps in {res['wall_s']:.0f} s wall "
          f"(load average {os.getloadavg()[0]:.1f})")
    print("\nloss per step (repeated rows):")
    print(f"{'step':>5} {'loss':>9} {'lm':>8} {'diffusion':>10} {'step s':>8}")
    for s in losses:
        print(f"{s['step']:5d} {s['loss']:9.4f} {s['lm_loss']:8.4f} {s['diffusion_loss']:10.4f} "
              f"{sum(s['times'].values()):8.1f}")
    print(f"\npartitions (ZeRO-3 optimizer-state files): total parameters {total:,}, / 2 = {total / 2:,.0f}")
    for r, n in sorted(parts.items()):
        print(f"  rank {r}: {n:,} fp32 elements ({n / (total / 2):.4f} x total/2)")
    print("\npredicted peak RSS per rank (pretrain.plan.estimate.host_memory_plan):")
    for k, v in plan.terms.items():
        print(f"  {k:58s}{v / GIB:7.2f} GiB")
    print(f"  {'total':58s}{predicted / GIB:7.2f} GiB")
    print(f"\n{'rank':>4} {'measured peak RSS':>18} {'predicted':>10} {'ratio':>6} {'peak incl. save':>16}")
    rows = {}
    for r in (0, 1):
        m = res["peak_train"][r]
        rows[r] = {"measured": m, "predicted": predicted, "ratio": m / predicted, "with_save": res["peak_all"][r]}
        print(f"{r:4d} {m / GIB:14.2f} GiB {predicted / GIB:6.2f} GiB {m / predicted:6.2f} "
              f"{res['peak_all'][r] / GIB:12.2f} GiB")
    print("peak RSS through step k (GiB, rank 0 / rank 1): " + ", ".join(
        f"{k + 1}: {d[0] / GIB:.2f}/{d[1] / GIB:.2f}" for k, d in enumerate(res["per_step"])))
    if a.json:
        Path(a.json).write_text(json.dumps({
            "losses": [s["loss"] for s in losses], "partitions": parts, "total_params": total, "rss": rows,
            "terms": plan.terms, "predicted": predicted, "wall_s": res["wall_s"], "baseline": baseline,
            "per_step": res["per_step"]}, indent=2))
    return 0


def one_device_overrides(root: Path, steps: int, lr: float, patch_encoder: str, gpu: bool, timer: str) -> list[str]:
    """overrides() changed for one rank: bf16 + NCCL without checkpointing on a GPU (fp32 + gloo on CPU),
    micro-batch 2 = the global batch, a step-time line every step."""
    out = [o for o in overrides(root, steps, lr, patch_encoder) if not o.startswith((
        "train.micro_batch_size", "train.precision", "train.activation_checkpointing", "distributed.backend",
        "train.run_dir"))]
    return out + ["train.micro_batch_size=2", f"train.precision={'bf16' if gpu else 'fp32'}",
                  f"train.activation_checkpointing={'false' if gpu else 'true'}",
                  f"distributed.backend={'nccl' if gpu else 'gloo'}", f"logging.timer={timer}",
                  f"train.run_dir={root / ('run_' + timer)}"]


def run_one_device(root: Path, a: argparse.Namespace) -> int:
    """Train on one rank of this machine's device per --timers entry; print per-step and median figures."""
    import statistics

    import torch

    gpu = torch.cuda.is_available()
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               PATH=path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    stats = build_data(root, a.images)
    device = torch.cuda.get_device_name() if gpu else "CPU (fp32, gloo: the rehearsal)"
    print(f"0.16B + {a.patch_encoder} patching{' with ' + ' '.join(a.extra) if a.extra else ''}; one rank on {device}; "
          f"{'bf16, NCCL, no activation checkpointing' if gpu else 'fp32, gloo, activation checkpointing'}; "
          f"micro-batch 2 x {SEQ} positions, {a.images} images of {P} patches per row "
          f"({stats['image_positions'] / stats['positions']:.1%} "
          f"image positions); {a.steps} steps per launch", flush=True)
    skip = min(3, max(a.steps - 1, 0))
    summary = []
    for timer in a.timers.split(","):
        cfg_args = ["--config", str(ROOT / "configs" / "transfusion_0.16b.yaml"),
                    *one_device_overrides(root, a.steps, a.lr, a.patch_encoder, gpu, timer), *a.extra]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(free_port()),
               "-m", "pretrain.train", *cfg_args]
        log_path = root / f"train_{timer}.log"
        t0 = time.time()
        with open(log_path, "w") as logf:
            p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=a.timeout)
        if p.returncode:
            print(f"timer {timer}: the trainer exited {p.returncode}; log {log_path}:\n{log_path.read_text()[-3000:]}")
            return 1
        rows = [json.loads(x) for x in open(root / f"run_{timer}" / "metrics.jsonl") if '"loss"' in x]
        print(f"\nlogging.timer={timer}: {len(rows)} steps in {time.time() - t0:.0f} s (launch included)")
        print(f"{'step':>5} {'loss':>8} {'step ms':>9} {'wall ms':>9} {'data %':>7} {'tok/s':>9} {'MFU':>6}")
        prev = None
        for r in rows:
            step_s = sum(r["times"].values())
            wall = f"{1e3 * (r['wall'] - prev['wall']):9.1f}" if prev else f"{'-':>9}"
            mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else f"{'n/a':>6}"
            print(f"{r['step']:5d} {r['loss']:8.4f} {1e3 * step_s:9.1f} {wall} "
                  f"{100 * r['times'].get('data', 0) / step_s:7.1f} "
                  f"{r['text_tokens_per_s']:9,.0f} {mfu}")
            prev = r
        late = rows[skip:]
        walls = [b["wall"] - a_["wall"] for a_, b in zip(rows[skip - 1:], late)] if skip else []
        med = {
            "step_s": statistics.median(sum(r["times"].values()) for r in late),
            "wall_s": statistics.median(walls) if walls else float("nan"),
            "data_share": statistics.median(r["times"].get("data", 0) / sum(r["times"].values()) for r in late),
            "mfu": statistics.median(r["mfu"] for r in late) if all("mfu" in r for r in late) else None,
        }
        summary.append((timer, med))
    print(f"\nmedians over steps {skip + 1}..{a.steps}:")
    print(f"{'timer':7} {'step ms':>9} {'wall ms':>9} {'x first':>8} {'data %':>7} {'MFU':>6}")
    for timer, m in summary:
        mfu = f"{100 * m['mfu']:5.1f}%" if m["mfu"] is not None else f"{'n/a':>6}"
        print(f"{timer:7} {1e3 * m['step_s']:9.1f} {1e3 * m['wall_s']:9.1f} "
              f"{m['wall_s'] / summary[0][1]['wall_s']:8.2f} "
              f"{100 * m['data_share']:7.1f} {mfu}")
    if a.json:
        Path(a.json).write_text(json.dumps({t: m for t, m in summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
