"""The real start-up of a job without its cost: `python -m pretrain.train --config C train.dry_run=true`.

One process, no process group, no weights: it reads the config, checks the batch plan against the
cluster shape (`--nodes/--gpus-per-node/--gpu`, else the Slurm allocation), checks the data (shards
exist, were packed for this seq_len, patch size and latent shape with this tokenizer), builds the
model on the meta device (what `zero.Init` would partition, without allocating it), derives the
full DeepSpeed config, prints the memory plan of `pretrain.plan.estimate` and exits: 0 when the job can
start, 2 with every problem listed otherwise. About a minute for 7B on a laptop CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.config import Config
from pretrain.plan.hardware import GPUS, Gpu, detect_gpu


@dataclass(frozen=True)
class ClusterShape:
    """Where the job will run."""

    nodes: int
    gpus_per_node: int
    gpu: Gpu

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def cluster_shape(nodes: int | None, gpus_per_node: int | None, gpu: str | None) -> ClusterShape:
    """Flags first, then the Slurm allocation (SLURM_JOB_NUM_NODES, SLURM_GPUS_ON_NODE or
    SLURM_NTASKS_PER_NODE), then 1 node x 8 GPUs; the GPU kind from the flag, this host's GPU, or H100-80GB."""
    env = os.environ
    nodes = nodes or int(env.get("SLURM_JOB_NUM_NODES", 1))
    gpn = gpus_per_node or int(env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_NTASKS_PER_NODE") or 8)
    if gpu:
        kind = GPUS[gpu]
    else:
        kind = (detect_gpu(torch.cuda.get_device_name()) if torch.cuda.is_available() else None) or GPUS["h100-80gb"]
    return ClusterShape(nodes, gpn, kind)


def check_data(cfg: Config) -> list[str]:
    """Every problem of the data section: missing tokenizer or shards, shards packed for another
    seq_len / patch size / latent shape / tokenizer. Empty list when all is well."""
    from data_pipeline import storage
    from data_pipeline.loader import check_stream
    from data_pipeline.sequence import RowSpec
    from contract.special_ids import load_special_ids

    problems: list[str] = []
    m = cfg.model
    try:
        ids = load_special_ids(cfg.data.tokenizer)
    except (FileNotFoundError, OSError, ValueError) as e:
        return [f"data.tokenizer: {e}"]
    spec = RowSpec(ids=ids, seq_len=cfg.data.seq_len, patch_size=m.patch_size,
                   latent_shape=(m.latent_channels, m.latent_size, m.latent_size), diffusion_steps=m.diffusion_steps,
                   caption_first_prob=0.0, image_first_max_timestep=0, caption_dropout=0.0)
    if not cfg.data.streams:
        problems.append("data.streams is empty: list the packed MDS directories")
    from pretrain.plan.data_keys import data_key_problems

    keys = data_key_problems(cfg)  # per key, naming the key to set; the checks below would repeat them vaguer
    problems += keys
    for section, streams in (("streams", cfg.data.streams), ("val_streams", cfg.data.val_streams)):
        for i, sc in enumerate(streams):
            where = f"data.{section}[{i}] ({sc.name})"
            root = sc.remote or sc.local  # a remote (s3://...) is read in place: its index.json and pack.json
            try:
                if not storage.exists(storage.join(root, "index.json")):
                    problems.append(f"{where}: {storage.join(root, 'index.json')} not found; pack the source with "
                                    "data_pipeline.pack" + (" to that remote" if sc.remote else ""))
                    continue
                if keys:
                    continue
                check_stream(sc, cfg.data, spec)
                problems += _check_tokenizer(where, root, cfg.data.tokenizer)
            except storage.StorageError as e:
                problems.append(f"{where}: {e}")
            except ValueError as e:
                problems.append(f"{where}: {e}")
    return problems


def _check_tokenizer(where: str, root: str, tokenizer: str) -> list[str]:
    """The shards were packed with data.tokenizer: the same file content (pack.json's
    identity.tokenizer_sha256), else, for packs that lack it, the same path. A data set copied to
    another place (a cluster filesystem, a bucket) keeps its checksum and passes. `root`: the stream's
    directory or remote URL, read by `data_pipeline.loader.pack_info` (no pack.json: nothing to check)."""
    from data_pipeline.loader import pack_info
    from data_pipeline.pack import file_sha256

    info = pack_info(root)
    if not info:
        return []
    packed, digest = info.get("tokenizer"), info.get("identity", {}).get("tokenizer_sha256")
    same = (digest == file_sha256(Path(tokenizer)) if digest and Path(tokenizer).is_file()
            else not packed or Path(packed).resolve() == Path(tokenizer).resolve())
    if not same:
        return [f"{where}: packed with tokenizer {packed} (sha256 {str(digest)[:12]}) but data.tokenizer={tokenizer} "
                "is another file; repack or point data.tokenizer at the packing tokenizer"]
    return []


def dry_run(cfg: Config, shape: ClusterShape) -> int:
    """Run every start-up check and print the plan; 0 = the job can start, 2 = problems (listed)."""
    from pretrain.plan.batch import BatchSizeError, derive_ds_config, plan_batch
    from pretrain.plan.estimate import DOES_NOT_FIT_ADVICE, format_plan, make_plan, mix_for
    from pretrain.model import Transfusion

    problems: list[str] = []
    print(f"dry run: {shape.nodes} nodes x {shape.gpus_per_node} GPUs ({shape.gpu.key}) = {shape.world_size} ranks")
    try:
        plan = plan_batch(cfg, shape.world_size)
        print(f"batch plan: global {plan.global_batch} = micro {plan.micro_batch} x accumulation {plan.grad_accum} "
              f"x ranks {plan.world_size} ({plan.global_batch * cfg.data.seq_len:,} positions per step)")
    except BatchSizeError as e:
        problems.append(str(e))
        plan = None
    data_problems = check_data(cfg)
    problems += data_problems
    print("data: " + ("ok" if not data_problems else f"{len(data_problems)} problem(s)"))
    with torch.device("meta"):  # what zero.Init would partition, without allocating it
        model = Transfusion(cfg.model)
    print(f"model built on the meta device: {sum(p.numel() for p in model.parameters()):,} parameters")
    ds = derive_ds_config(cfg, plan, on_gpu=True) if plan else None
    if ds:
        print("deepspeed config: " + json.dumps(ds, sort_keys=True))
    est = make_plan(cfg, shape.nodes, shape.gpus_per_node, shape.gpu, ds, mix_for(cfg))
    print(format_plan(est, cfg, [0.35, 0.45], cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len))
    if not est.fits:
        problems.append(
            f"train.micro_batch_size={cfg.train.micro_batch_size}: {est.gpu_bytes / 2**30:.1f} GiB per GPU does not "
            f"fit "
            f"in {shape.gpu.key} ({shape.gpu.memory_bytes / 2**30:.1f} GiB); {DOES_NOT_FIT_ADVICE}")
    if problems:
        print(f"dry run FAILED: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 2
    print("dry run OK: the job can start")
    return 0
