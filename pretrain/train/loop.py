"""The training loop of `python -m pretrain.train --config PATH [key=value ...]` (entry: pretrain/train/__main__.py).

The same code path runs under `deepspeed`, `torchrun`, `accelerate launch`, plain `srun` and a
bare `python`. Exit codes: 0 done; 75 (EX_TEMPFAIL) stopped on SIGUSR1/SIGTERM after saving a
checkpoint, requeue me; 1 failed (e.g. too many NaN/Inf steps in a row). See docs/train.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from contract.batch import TransfusionBatch
from contract.dist_env import DistEnv
from data_pipeline.loader import build_loader
from pretrain.train import checkpoint
from pretrain import configlib
from pretrain.train import distributed
from pretrain.config import Config, config_changes, load_config, save_config
from pretrain.train.ema import ShardedEMA
from pretrain.plan.batch import BatchPlan, BatchSizeError, micro_batch_sizes, plan_batch
from pretrain.plan.data_keys import data_key_problems, small_val_streams
from pretrain.train.engine import apply_optim_config, build_engine
from pretrain.train.hooks import HookContext, TrainHooks, check_hooks
from pretrain.train.metrics import MetricsWriter, StepStats, StepTimer, detect_peak_flops
from pretrain.train.schedule import lr_at, set_lr

log = logging.getLogger("pretrain")


class TrainingDiverged(RuntimeError):
    """Too many NaN/Inf steps in a row."""


class StopRequest:
    """SIGUSR1/SIGTERM set a flag; the loop finishes its step, saves and exits with EXIT_REQUEUE."""

    def __init__(self) -> None:
        self.requested = False  # this rank got a signal
        self.agreed = False  # some rank got one (all-reduced each step): every rank stops together
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        log.warning("received signal %d: finishing this step, then saving and exiting", signum)


@dataclass
class Run:
    """Everything the loop carries from step to step."""

    cfg: Config
    env: DistEnv
    plan: BatchPlan
    engine: Any
    loader: Any
    val_loaders: dict[str, Any]
    writer: MetricsWriter | None
    stop: StopRequest
    step: int = 0  # optimizer steps done
    bad_in_row: int = 0
    bad_total: int = 0
    timer: StepTimer = field(default_factory=StepTimer)
    prefetch: "StepPrefetcher | None" = None
    loader_state: dict = field(default_factory=dict)  # loader position after the last step's batches
    ema: "ShardedEMA | None" = None  # train.ema_decay > 0: this rank's EMA partitions
    hooks: TrainHooks = field(default_factory=TrainHooks)  # sampling, evaluation, train.init_from


def parse_args(argv: list[str] | None) -> tuple[str, list[str], dict[str, Any]]:
    """--config PATH plus key=value overrides, and the cluster shape a dry run checks against;
    --local_rank (passed by the deepspeed launcher) is ignored."""
    p = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/tiny.yaml")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100")
    p.add_argument("--nodes", type=int, default=None, help="dry run: nodes (default: the Slurm allocation, else 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="dry run: GPUs per node (default: Slurm, else 8)")
    p.add_argument("--gpu", default=None,
                   help="dry run: GPU kind, e.g. h100-80gb (python -m pretrain.plan.estimate --list-gpus)")
    a = p.parse_args(argv)
    return a.config, a.overrides, {"nodes": a.nodes, "gpus_per_node": a.gpus_per_node, "gpu": a.gpu}


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere, so the console shows one copy of each line."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(message)s",
        stream=sys.stdout,
        force=True,
    )


def build_loaders(cfg: Config, plan: BatchPlan) -> tuple[Any, dict[str, Any]]:
    """Train loader, and one validation loader per data.val_streams entry (per-modality val loss)."""
    m = cfg.model
    kw = dict(
        micro_batch_size=plan.micro_batch, seed=cfg.train.seed, patch_size=m.patch_size,
        latent_shape=(m.latent_channels, m.latent_size, m.latent_size), diffusion_steps=m.diffusion_steps,
    )
    train = build_loader(cfg.data, split="train", **kw)
    # Validation reads a few batches in the main thread: no worker processes, so nothing forks while
    # the prefetch thread is inside the train loader (that killed train workers at the next epoch).
    val = {sc.name: build_loader(replace(cfg.data, val_streams=[sc], num_workers=0), split="val", **kw)
           for sc in cfg.data.val_streams}
    return train, val


class StepPrefetcher:
    """Fetches the next step's micro-batches in a background thread while the current step computes.

    Each step's batches come with the loader state taken right after fetching them, so a checkpoint
    records exactly what was consumed, never what was prefetched.
    """

    def __init__(self, loader: Any, grad_accum: int) -> None:
        self.loader, self.grad_accum = loader, grad_accum
        self._it: Iterator[TransfusionBatch] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: Future | None = None

    def _fetch(self) -> tuple[list[TransfusionBatch], dict]:
        if self._it is None:
            self._it = iter(self.loader)
        batches = [next(self._it) for _ in range(self.grad_accum)]
        return batches, self.loader.state_dict()

    def get(self) -> tuple[list[TransfusionBatch], dict]:
        """This step's micro-batches and the loader state after them; starts fetching the next step."""
        fut = self._next or self._pool.submit(self._fetch)
        out = fut.result()
        self._next = self._pool.submit(self._fetch)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def batch_digest(batches: list[TransfusionBatch]) -> int:
    """A 48-bit fingerprint of the sequences (tokens, latents): what resume tests compare."""
    h = hashlib.sha1()
    for b in batches:
        h.update(b.tokens.numpy().tobytes())
        h.update(b.latents.float().numpy().tobytes())
    return int(h.hexdigest()[:12], 16)


SEQUENCE_DIGEST_BITS = 40  # a step's sum of per-sequence digests stays exact in float64 up to 2**13 sequences


def sequence_digests(b: TransfusionBatch) -> list[int]:
    """One 40-bit fingerprint per packed sequence of `b` (its tokens and the latents of its images)."""
    out, first = [], 0  # images are numbered row-major: row i holds images first .. its largest id
    for i in range(b.tokens.shape[0]):
        end = max(first, int(b.image_ids[i].max()) + 1)
        h = hashlib.sha1(b.tokens[i].numpy().tobytes())
        h.update(b.latents[first:end].float().numpy().tobytes())
        out.append(int(h.hexdigest()[: SEQUENCE_DIGEST_BITS // 4], 16))
        first = end
    return out


@dataclass(frozen=True)
class StepCounts:
    """A step's global counts (all ranks, all micro-batches) and what the loss divides by."""

    text_denom: float  # per-micro-batch denominator of the CE sum: global text targets / (gas x world)
    image_denom: float  # per-micro-batch denominator of the MSE sum: global images / (gas x world)
    text_targets: int  # global text targets of the step
    images: int  # global images of the step
    rank_digests: list[int]  # each rank's `batch_digest` of its sequences
    sequence_digest: int  # the step's order-independent digest: the same for the same sequences on any world size


def global_denominators(batches: list[TransfusionBatch], plan: BatchPlan, rank: int) -> StepCounts:
    """All-reduce the step's text-target and image counts; return per-micro-batch denominators (StepCounts).

    DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over
    ranks, so dividing sums by global/(gas*world) yields exactly d(sum / global count).
    Also carries the per-rank digests and the step's order-independent sequence digest (the sum of
    every rank's `sequence_digests`): equal for the same sequences whatever the number of ranks.
    """
    digests = [0.0] * plan.world_size
    digests[rank] = float(batch_digest(batches))
    text = sum(b.num_text_targets for b in batches)
    images = sum(b.num_images for b in batches)
    seqs = float(sum(d for b in batches for d in sequence_digests(b)))
    out = distributed.all_reduce_sum([float(text), float(images), seqs, *digests])
    g_text, g_img = int(out[0]), int(out[1])
    scale = plan.grad_accum * plan.world_size
    return StepCounts(max(g_text, 1) / scale, max(g_img, 1) / scale, g_text, g_img, [int(d) for d in out[3:]],
                      int(out[2]))


def forward_backward(
    engine: Any, batches: list[TransfusionBatch], text_denom: float, image_denom: float, timer: StepTimer
) -> tuple[float, float, float | None]:
    """One optimizer step over the micro-batches; returns this rank's (LM CE sum, diffusion MSE sum) and,
    at ZeRO stage 0, the step's gradient norm before clipping (DeepSpeed reports it only from its ZeRO
    optimizers; stage 0 clips without keeping it: `engine.clip_fp32_gradients`), else None."""
    dev = distributed.device()
    lm_sum = diff_sum = torch.zeros((), device=dev)  # summed on the device: one host sync per step, not per micro-batch
    norm = None
    for i, b in enumerate(batches):
        with timer.phase("forward"):
            out = engine(b.to(dev), text_denom=text_denom, image_denom=image_denom)
        with timer.phase("backward"):
            engine.backward(out.loss)  # stage 0: all-reduces the gradients at the accumulation boundary
        with timer.phase("optimizer"):
            if i == len(batches) - 1 and engine.zero_optimization_stage() == 0:
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                norm = float(torch.nn.utils.get_total_norm(grads))
            engine.step()  # applies the update at the accumulation boundary (the last micro-batch)
        lm_sum = lm_sum + out.lm_loss_sum
        diff_sum = diff_sum + out.diffusion_loss_sum
    return float(lm_sum), float(diff_sum), norm


def train_step(run: Run) -> StepStats:
    """Fetch all micro-batches, normalise by global counts, step, and gather the step's losses."""
    run.timer.reset()
    with run.timer.phase("data"):
        batches, run.loader_state = run.prefetch.get()
    counts = global_denominators(batches, run.plan, run.env.rank)
    g_text, g_img = counts.text_targets, counts.images
    lr = lr_at(run.step, run.cfg.optim, run.cfg.train.steps)
    set_lr(run.engine.optimizer, lr)
    lm_sum, diff_sum, norm = forward_backward(run.engine, batches, counts.text_denom, counts.image_denom, run.timer)
    if run.ema is not None and run.engine.was_step_applied():
        run.ema.update()
    lm_g, diff_g, stop = distributed.all_reduce_sum([lm_sum, diff_sum, float(run.stop.requested)])
    run.stop.agreed = stop > 0  # a signal seen by any rank stops every rank after this step
    lm = lm_g / max(g_text, 1)
    diff = diff_g / max(g_img, 1)
    gn = norm if norm is not None else run.engine.get_global_grad_norm()
    return StepStats(
        step=run.step + 1, loss=lm + run.cfg.model.diffusion_loss_weight * diff, lm_loss=lm, diffusion_loss=diff,
        lr=lr, grad_norm=float(gn) if gn is not None else float("nan"), text_tokens=g_text, images=g_img,
        applied=bool(run.engine.was_step_applied()), times=dict(run.timer.times), digest=counts.rank_digests,
        sequence_digest=counts.sequence_digest,
    )


def check_bad_step(run: Run, s: StepStats) -> None:
    """Count NaN/Inf steps (DeepSpeed skipped their update); stop after train.max_bad_steps in a row."""
    finite = s.applied and torch.isfinite(torch.tensor(s.loss)).item()
    if finite:
        run.bad_in_row = 0
        return
    run.bad_in_row += 1
    run.bad_total += 1
    log.warning("step %d: loss %s / grad norm %s is not finite; update skipped (%d in a row, %d total)",
                s.step, s.loss, s.grad_norm, run.bad_in_row, run.bad_total)
    if run.bad_in_row >= run.cfg.train.max_bad_steps:
        raise TrainingDiverged(
            f"{run.bad_in_row} NaN/Inf steps in a row (train.max_bad_steps={run.cfg.train.max_bad_steps}) at step "
            f"{s.step}. Look at: the learning rate (optim.lr, optim.warmup_steps), bf16 overflow "
            f"(try train.precision=fp32), and the data of these steps (the digests in metrics.jsonl; "
            f"check the shards for NaN latents). Resume from the last checkpoint after fixing."
        )


def warn_small_val_streams(cfg: Config, micro_batch: int, world_size: int) -> list[str]:
    """Log a warning for each validation stream with fewer rows than `world_size` x `micro_batch`, naming the
    counts and what to change (`pretrain.plan.data_keys.small_val_streams`); returns the messages. Such a
    stream is still validated (`_val_batches` reads its rows by sample id), on fewer sequences than a batch."""
    warned = small_val_streams(cfg, micro_batch, world_size)
    for w in warned:
        log.warning("%s", w)
    return warned


def _val_batches(loader: Any, limit: int, micro_batch: int, rank: int, world_size: int) -> tuple[list, int]:
    """This rank's share of a val stream's first `limit` micro-batches, and the number of forwards every rank runs.

    The validation set is the first min(rows, limit x micro_batch) sequences of the stream in its (unshuffled)
    global order, read by sample id (`StreamingDataset.get_item`), so it is the same set, each sequence with
    the same noise (seeded by its sample id), for any number of ranks: rank r takes ids r, r + world, ...
    Streaming's own per-rank partition pads ranks with repeated samples and drops each rank's partial
    batch, and cutting every rank to the smallest count dropped more: the loss depended on the world size.
    ZeRO-3 needs every rank to run the same number of forwards: the count returned is the maximum over ranks.
    """
    from data_pipeline.loader import collate

    ds = loader.dataset
    n = min(int(ds.num_samples), limit * micro_batch)
    mine = list(range(rank, n, world_size))
    batches = [collate([ds.get_item(i) for i in mine[k : k + micro_batch]]) for k in range(0, len(mine), micro_batch)]
    forwards = int(distributed.all_reduce_max([float(len(batches))])[0])
    if len(batches) < forwards:  # a forward whose result is dropped, so the ranks' ZeRO-3 gathers pair up
        batches += [None] * (forwards - len(batches))
    return batches, forwards


def _padding_batch(loader: Any) -> TransfusionBatch:
    """A batch to run (and drop) on a rank that has fewer validation batches than another: sample 0."""
    from data_pipeline.loader import collate

    return collate([loader.dataset.get_item(0)])


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Mean LM loss per text target and diffusion loss per image, per val stream and overall (every rank).

    The same figure for any number of ranks (`_val_batches`), up to the float summation order."""
    run.engine.eval()
    dev = distributed.device()
    sums: list[float] = []
    for loader in run.val_loaders.values():
        s = [0.0, 0.0, 0.0, 0.0]  # LM CE sum, diffusion MSE sum, text targets, images
        batches, _ = _val_batches(loader, run.cfg.logging.val_batches, run.plan.micro_batch, run.env.rank,
                                  run.env.world_size)
        for b in batches:
            out = run.engine((b if b is not None else _padding_batch(loader)).to(dev))
            if b is None:
                continue
            s = [s[0] + float(out.lm_loss_sum), s[1] + float(out.diffusion_loss_sum),
                 s[2] + out.num_text_tokens, s[3] + out.num_images]
        sums += s
    run.engine.train()
    g = distributed.all_reduce_sum(sums)
    out: dict[str, float] = {}
    for i, name in enumerate(run.val_loaders):
        lm, diff, n_text, n_img = g[4 * i : 4 * i + 4]
        if n_text:
            out[f"val/{name}/lm_loss"] = lm / n_text
        if n_img:
            out[f"val/{name}/diffusion_loss"] = diff / n_img
    tot = [sum(g[k::4]) for k in range(4)]
    if tot[2]:
        out["val/lm_loss"] = tot[0] / tot[2]
    if tot[3]:
        out["val/diffusion_loss"] = tot[1] / tot[3]
    return out


def client_state(run: Run) -> dict[str, Any]:
    """This rank's resume state, stored in its DeepSpeed checkpoint shard."""
    return {
        "step": run.step, "loader": run.loader_state, "rng": checkpoint.rng_state(),
        "config": configlib.to_dict(run.cfg), "world_size": run.env.world_size,
        "bad_total": run.bad_total,
    }


def save(run: Run) -> None:
    # the EMA goes into the same fresh directory before the marker, which then covers it
    extra = (lambda d: run.ema.save(d, run.env.rank)) if run.ema is not None else None
    path = checkpoint.save(run.engine, run.cfg, run.step, client_state(run), extra=extra)
    log.info("saved checkpoint %s", path)


class ResumeError(RuntimeError):
    """The chosen checkpoint cannot be resumed by this launch (config or world size differ)."""


def check_resume(cfg: Config, env: DistEnv) -> Path | None:
    """The checkpoint to resume (checkpoint.resume), checked against this launch before anything is built.

    Raises ResumeError naming every model or data-shape key that differs from the checkpoint's
    config (pretrain.config.RESUME_FIXED); other changed keys (train.steps, logging...) are logged.
    """
    path = checkpoint.find_resume(cfg.checkpoint.resume, cfg.train.run_dir)
    if path is None:
        log.info("starting from scratch (no complete checkpoint in %s)", checkpoint.checkpoint_root(cfg.train.run_dir))
        return None
    fixed, free = config_changes(checkpoint.trained_config(path), cfg)
    if fixed:
        lines = "\n".join(f"  {k}: checkpoint {a!r}, this launch {b!r}" for k, (a, b) in fixed.items())
        raise ResumeError(
            f"{path} was trained with a different model or data shape:\n{lines}\nResume with the checkpoint's "
            f"values (see {path / checkpoint.CONFIG}), or start a new train.run_dir (or checkpoint.resume=none); "
            "to start a new run from these weights use train.init_from with an export."
        )
    for k, (a, b) in free.items():
        log.info("config change on resume: %s %r -> %r", k, a, b)
    saved = checkpoint.saved_world_size(path)
    if saved != env.world_size:
        log.info("%s was saved by %d ranks, this job has %d: resuming through DeepSpeed's universal checkpoint "
                 "(same global batch; the accumulation steps adapt)", path, saved, env.world_size)
    return path


def plan_for(cfg: Config, env: DistEnv, ckpt: Path | None) -> BatchPlan:
    """The batch plan; a resume on another world size that cannot keep the global batch says what to set."""
    try:
        return plan_batch(cfg, env.world_size)
    except BatchSizeError as e:
        if ckpt is None or checkpoint.saved_world_size(ckpt) == env.world_size:
            raise
        g = cfg.train.global_batch_size
        micro = micro_batch_sizes(g, env.world_size)
        raise ResumeError(
            f"{ckpt} was trained with train.global_batch_size={g}, which a resume keeps, and {g} sequences do not "
            f"split over {env.world_size} ranks x train.micro_batch_size={cfg.train.micro_batch_size}. Set "
            f"train.micro_batch_size to one of {micro or 'none'}"
            + ("" if micro else f", or use a number of ranks that divides {g}") + "."
        ) from e


def resume(run: Run, path: Path) -> None:
    """Load model, optimizer, step, loader position and RNG states from checkpoint `path` (every rank).

    From another world size: DeepSpeed's universal checkpoint (re-partitioned weights and Adam moments),
    the loader position of the same global sample count (streaming's global sample order does not
    depend on the number of ranks at a fixed data.num_canonical_nodes), the EMA re-sliced; the RNG
    streams are not restored (they are per rank; the batches' noise comes from the loader, not from them).
    """
    saved = checkpoint.saved_world_size(path)
    reshard = saved != run.env.world_size
    client = checkpoint.load(run.engine, path, universal=reshard)
    run.step = int(client["step"])
    run.bad_total = int(client.get("bad_total", 0))
    run.loader.load_state_dict(client["loader"])
    run.loader_state = client["loader"]
    # optim.* of this launch, not the saved param groups' (DeepSpeed restores those); logged as the optimizer holds them
    groups = apply_optim_config(run.engine.optimizer, run.cfg, lr_at(run.step, run.cfg.optim, run.cfg.train.steps))
    log.info("optimizer after resume: %s", json.dumps(groups))
    if reshard:
        log.info("RNG states not restored: %s was saved by %d ranks", path, saved)
    else:
        checkpoint.set_rng_state(client["rng"])
    if run.ema is not None and not run.ema.load(path, run.env.rank, run.env.world_size):
        log.warning("%s holds no EMA (train.ema_decay was 0): the EMA starts from the resumed weights", path)
    log.info("resumed from %s at step %d", path, run.step)


def hook_context(run: Run) -> HookContext:
    return HookContext(run.engine.module, run.cfg, run.writer, run.step, run.env.is_main)


def setup(argv: list[str] | None, hooks: TrainHooks) -> Run:
    """Config, process group, checks, engine, loaders, resume, metrics; then (only then) RUN_DIR/config.yaml.

    A launch that fails here leaves the run directory and /dev/shm as it found them.
    """
    path, overrides, _ = parse_args(argv)
    cfg = load_config(path, overrides)  # model.vocab_size from data.tokenizer
    if cfg.logging.eval_every > 0 and not (cfg.data.vae and cfg.data.tokenizer):
        raise configlib.ConfigError("logging.eval_every > 0 needs data.vae (the VAE that decodes samples) "
                                    "and data.tokenizer; set them or logging.eval_every=0")
    check_hooks(cfg, hooks)
    if problems := data_key_problems(cfg):  # a second, before the process group and DeepSpeed
        raise configlib.ConfigError("the config disagrees with the data's pack.json:\n  - " + "\n  - ".join(problems))
    env = distributed.init_distributed(cfg.distributed.backend, cfg.distributed.timeout_minutes)
    setup_logging(env.rank)
    try:
        return _build_run(cfg, env, hooks)
    except BaseException:
        distributed.remove_shm_buffer(env)
        raise


def _build_run(cfg: Config, env: DistEnv, hooks: TrainHooks) -> Run:
    ckpt = check_resume(cfg, env)
    plan = plan_for(cfg, env, ckpt)
    log.info("launcher %s, %d ranks; global batch %d = micro %d x accumulation %d x ranks %d",
             env.launcher, env.world_size, plan.global_batch, plan.micro_batch, plan.grad_accum, plan.world_size)
    if env.is_main:
        warn_small_val_streams(cfg, plan.micro_batch, env.world_size)
    reshard = ckpt is not None and checkpoint.saved_world_size(ckpt) != env.world_size
    if reshard:
        if env.is_main:
            log.info("universal checkpoint: %s", checkpoint.to_universal(ckpt))
        distributed.barrier()
    # a checkpoint overrides train.init_from
    engine, _ = build_engine(cfg, plan, init_weights=hooks.initial_tensors if ckpt is None else None,
                             load_universal=reshard)
    loader, val_loaders = build_loaders(cfg, plan)
    run = Run(cfg, env, plan, engine, loader, val_loaders, None, StopRequest(), hooks=hooks,
              timer=StepTimer(cfg.logging.timer))
    if cfg.train.ema_decay > 0:
        run.ema = ShardedEMA(engine.module.named_parameters(), cfg.train.ema_decay)
    if ckpt is not None:
        resume(run, ckpt)
    distributed.barrier()  # every rank loaded: only now does this launch own the run directory
    if ckpt is not None and env.is_main and cfg.checkpoint.resume != "auto":
        moved = checkpoint.abandon_ahead(cfg.train.run_dir, ckpt, run.step)
        if moved is not None:
            log.warning("rollback to step %d: the checkpoints ahead of it (%s) moved to %s; checkpoint.resume=auto "
                        "now follows this line", run.step, ", ".join(sorted(p.name for p in moved.iterdir())), moved)
    distributed.barrier()
    run.writer = make_writer(cfg, env, plan, engine)
    if env.is_main:
        save_config(cfg, Path(cfg.train.run_dir) / "config.yaml")
    run.prefetch = StepPrefetcher(loader, plan.grad_accum)  # starts after resume has positioned the loader
    return run


def make_writer(cfg: Config, env: DistEnv, plan: BatchPlan, engine: Any) -> MetricsWriter:
    """Rank 0's metrics sinks; FLOPs per step for MFU from pretrain.plan.estimate (the shards' document mix)."""
    from pretrain.plan.estimate import flops_per_position, mix_for

    flops = flops_per_position(cfg.model, cfg.data.seq_len, mix_for(cfg)) * cfg.data.seq_len * plan.global_batch
    return MetricsWriter(cfg.train.run_dir, enabled=env.is_main, tensorboard=cfg.logging.tensorboard,
                         flops_per_step=flops, peak_flops=detect_peak_flops(cfg.logging.peak_flops),
                         world_size=env.world_size, patches_per_image=cfg.model.patches_per_image)


def after_step(run: Run, s: StepStats) -> None:
    """Log, validate, sample and checkpoint on their schedules."""
    lg, ck = run.cfg.logging, run.cfg.checkpoint
    run.writer.record_step(s, log_now=run.step % lg.every == 0 or run.step == 1)
    if run.bad_total and run.step % lg.every == 0:
        run.writer.scalars({"train/bad_steps_total": float(run.bad_total)}, run.step)
    if run.val_loaders and lg.val_every > 0 and run.step % lg.val_every == 0:
        run.writer.scalars(validate(run), run.step)
    if lg.sample_every > 0 and run.step % lg.sample_every == 0:
        run.hooks.sample(hook_context(run))
    if lg.eval_every > 0 and run.step % lg.eval_every == 0:
        run.hooks.evaluate(hook_context(run))
    if ck.every > 0 and run.step % ck.every == 0 and run.step < run.cfg.train.steps:
        save(run)
    checkpoint.fault_point("kill_after_step", run.step)
    checkpoint.fault_point("sigusr1_rank1_after_step", run.step)


def train(run: Run) -> int:
    """The loop; returns the process exit code."""
    start = run.step
    if start >= run.cfg.train.steps:  # exit 0 (nothing failed), but never silently: docs/train.md, "Resuming"
        if start == run.cfg.train.steps:
            log.warning("nothing to train: the resumed checkpoint is at step %d = train.steps; raise train.steps "
                        "to train on", start)
        else:
            log.warning("nothing to train: the resumed checkpoint is at step %d, past train.steps=%d (a checkpoint is "
                        "never cut back); raise train.steps above %d to train on, or resume an earlier step with "
                        "checkpoint.resume=PATH", start, run.cfg.train.steps, start)
    while run.step < run.cfg.train.steps:
        s = train_step(run)
        run.step += 1
        check_bad_step(run, s)
        after_step(run, s)
        if run.stop.agreed and run.step < run.cfg.train.steps:
            if not (run.cfg.checkpoint.every > 0 and run.step % run.cfg.checkpoint.every == 0):
                save(run)
            log.warning("stopped at step %d on signal; exiting %d so the job is requeued",
                        run.step, distributed.EXIT_REQUEUE)
            return distributed.EXIT_REQUEUE
    if run.step > start:
        save(run)
    log.info("done: %d steps", run.step)
    return 0


def main(argv: list[str] | None = None, hooks: TrainHooks | None = None) -> int:
    """The trainer; `hooks` (sampling, evaluation, train.init_from) come from pretrain/train/__main__.py."""
    path, overrides, shape = parse_args(argv)
    try:
        cfg = load_config(path, overrides)
    except configlib.ConfigError as e:
        if any(o.replace(" ", "") == "train.dry_run=true" for o in overrides):
            print(f"dry run FAILED: 1 problem(s)\n  - {e}")
            return 2
        raise
    if cfg.train.dry_run:
        from pretrain.plan.dry_run import cluster_shape, dry_run

        return dry_run(cfg, cluster_shape(**shape))
    run = setup(argv, hooks or TrainHooks())
    try:
        return train(run)
    except TrainingDiverged as e:
        log.error("%s", e)
        return 1
    finally:
        run.writer.close()
        run.prefetch.close()
        if not torch.cuda.is_available():
            distributed.remove_shm_buffer(run.env)  # peers keep their mappings; only the name goes


