"""A user's data in one command: texts, image-caption pairs and interleaved documents -> tokenizer -> VAE ->
latents -> packed shards -> `OUT/data.yaml`, everything `python -m pretrain.train` needs.

    python -m data_pipeline.prepare --text 'texts/*.jsonl' --pairs pairs.jsonl --out DIR --image-size 256
    python -m pretrain.train --config configs/tiny.yaml,DIR/data.yaml

Stages, each skipped when its output is finished from the same inputs and options (the stages' own
identity checks; a stage whose inputs changed is redone, and the packs that depend on it with it):

1. tokenizer: a sentencepiece model trained on the texts AND the captions and interleaved texts
   (`OUT/tokenizer/spm.model`), or `--tokenizer spm.model` copied there and wrapped with special ids;
2. VAE: `--vae DIR` as given, or one trained on the images (`OUT/vae`) with the recipe for the image
   size (`vae_recipe`; flags override single fields);
3. precompute: every image encoded once (`OUT/latents/{pairs,interleaved}`), spread over ranks;
4. pack: every source tokenized and packed into `--seq-len` rows (`OUT/shards/{text,pairs,interleaved}`),
   every `--val-every`-th document to the validation split;
5. `OUT/data.yaml`: the `data:` section (tokenizer, VAE, shards, mix), the `model:` keys the data fixes
   (`latent_channels`, `latent_size`, `patch_size`; `vocab_size` follows `data.tokenizer`) and
   `logging.sample_prompts` taken from the validation captions; written last.

Many ranks: `torchrun --nproc_per_node N -m data_pipeline.prepare ...` (or srun): rank 0 trains the
tokenizer and the VAE while the others wait for it, every rank encodes its share of the images, rank 0
packs and writes data.yaml.

Object storage (`data_pipeline.storage`: endpoint and credentials from the environment): inputs may be
`s3://` URLs (texts: .jsonl/.txt objects; images: webdataset .tar or .parquet objects), and `--out` may be
a prefix (`--out s3://bucket/mydata --local DIR`). Then the latents and shards are written under the
prefix, the tokenizer and VAE are trained in `--local DIR` and published to `OUT/tokenizer` and `OUT/vae`
(their stage record last), and `DIR/data.yaml` points the trainer at the shards in place
(`data.streams[].remote`, cached in `DIR/cache`); a copy is written to `OUT/data.yaml`. Every stage's record
lives under OUT, so the same command on another machine (another `--local`) skips every stage and fetches
the tokenizer and VAE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml

from contract.dist_env import detect_env
from contract.fileio import write_json_atomic
from data_pipeline import pack, precompute, sources, storage, tokenizer, vae as vaelib

KINDS = ("pairs", "interleaved")
#: identity records of the stages prepare owns (the tokenizer and a trained VAE); written last
DONE = "prepare.json"


@dataclass
class VaeRecipe:
    """How the VAE is trained (`data_pipeline.vae.train_vae`) and the patch size its latents are cut into.

    `steps=0` saves a randomly initialised VAE with measured latent statistics (tests: seconds).
    """

    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    latent_channels: int = 8
    downsample: int = 8
    width: int = 64
    fg_weight: float = 1.0
    latent_noise: float = 0.0
    kl_weight: float = 1e-6
    max_images: int = 20000  # images held in memory for training
    patch_size: int = 2


def vae_recipe(image_size: int) -> VaeRecipe:
    """The VAE recipe for `image_size`: the one place a per-size recipe plugs in.

    Uses `data_pipeline.vae.recipe_for(image_size)` when that module provides one (its fields that
    VaeRecipe knows are taken), else VaeRecipe's defaults (8x downsampling, 8 channels, 2x2 patches:
    `image_size / 16` squared patches per image).
    """
    recipe_for = getattr(vaelib, "recipe_for", None)
    if recipe_for is None:
        return VaeRecipe()
    got = recipe_for(image_size)
    got = got if isinstance(got, dict) else asdict(got)
    known = {f.name for f in dataclasses.fields(VaeRecipe)}
    return VaeRecipe(**{k: v for k, v in got.items() if k in known})


@dataclass
class PrepareOptions:
    """What `run` prepares (the CLI flags, typed); Python callers build it directly."""

    out: str  # a local directory or an object-storage prefix (s3://bucket/prefix; then `local` is required)
    texts: list[str] = field(default_factory=list)  # .jsonl/.txt files, folders or globs
    pairs: list[str] = field(default_factory=list)  # pairs .jsonl, image folders with caption files, webdataset .tar
    interleaved: list[str] = field(default_factory=list)  # interleaved .jsonl ({"segments": [...]})
    image_size: int = 256
    seq_len: int = 4096
    tokenizer: str = ""  # an existing sentencepiece .model to use (copied and wrapped); "" = train one
    vocab_size: int = 8000
    vae: str = ""  # an existing diffusers AutoencoderKL directory; "" = train one with `recipe`
    recipe: VaeRecipe | None = None  # None = vae_recipe(image_size)
    patch_size: int | None = None  # None = the recipe's
    val_every: int = 10  # every N-th document of each source goes to its validation split
    image_position_share: float | None | Literal["auto"] = "auto"  # auto: see image_share; None = mix streams by size
    sample_prompts: int = 4  # validation captions written to logging.sample_prompts
    seed: int = 0
    part_size: int = 1000  # records per precompute part (the unit of work spread over ranks)
    batch_size: int = 32  # images per VAE forward in precompute
    decode_threads: int = 4
    wait_timeout: float = 6 * 3600  # ranks > 0 wait this long for rank 0's tokenizer/VAE/precompute
    local: str = ""  # with a remote `out`: local directory for the tokenizer, VAE, data.yaml and the stream cache

    def __post_init__(self) -> None:
        if not (self.texts or self.pairs or self.interleaved):
            raise ValueError("nothing to prepare: give --text, --pairs and/or --interleaved")
        if storage.is_remote(self.out) and not self.local:
            raise ValueError(f"--out {self.out}: a remote --out needs --local DIR, a local directory for the "
                             "tokenizer, the VAE and the trainer's data.yaml (the shards stay in the bucket)")
        if self.local and storage.is_remote(self.local):
            raise ValueError(f"--local {self.local}: must be a local directory")
        if self.val_every < 0:
            raise ValueError(f"--val-every {self.val_every}: must be >= 0 (0: no validation split)")


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj)


@dataclass(frozen=True)
class Place:
    """Where prepare writes: `out` (a local directory or a remote prefix: latents, shards, every stage record)
    and `work` (local: the tokenizer and VAE the trainer reads, data.yaml, the stream cache). They are the
    same directory for a local --out."""

    out: str
    work: Path

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.out)

    def at(self, *parts: str) -> str:
        """A path under out (a URL for a remote out)."""
        return storage.join(self.out, *parts)


def _record(d: str | Path) -> dict | None:
    """The stage record in `d` (a local directory or a remote prefix), None when absent."""
    f = storage.join(d, DONE)
    return storage.read_json(f) if storage.exists(f) else None


def _done(d: str | Path, identity: dict) -> bool:
    """`d` holds a finished stage output of this identity."""
    rec = _record(d)
    return rec is not None and rec.get("identity") == identity


def _publish(local: Path, remote: str) -> None:
    """Copy a finished local stage directory to `remote`, replacing what was there, its record last (a crash
    midway leaves no record: the next run publishes again)."""
    storage.delete_tree(remote)
    storage.copy_tree(local, remote, skip=(DONE,))
    storage.upload_file(local / DONE, storage.join(remote, DONE))


def _fetch(remote: str, local: Path) -> Path:
    """A local copy of the finished stage directory `remote` at `local` (downloaded beside it first and renamed,
    so ranks sharing the directory never see a half copy); returns the directory holding the copy."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}-", dir=local.parent))
    storage.copy_tree(remote, tmp)
    if local.exists():
        shutil.rmtree(local, ignore_errors=True)
    try:
        tmp.rename(local)
    except OSError:  # another rank renamed its copy first: use ours, same bytes
        return tmp
    return local


def _stage_done(place: Place, name: str, identity: dict, rank: int = 0) -> Path | None:
    """The local directory of stage `name` when it is finished with this identity: done locally (and published
    to a remote out when the publish was lost), or done under a remote out and fetched; None otherwise."""
    local = place.work / name
    if _done(local, identity):
        if place.remote and rank == 0 and not _done(place.at(name), identity):
            _publish(local, place.at(name))
        return local
    if place.remote and _done(place.at(name), identity):
        print(f"[prepare] {name}: finished under {place.at(name)}; fetched to {local}")
        return _fetch(place.at(name), local)
    return None


def _wait_for(d: str | Path, identity: dict, timeout: float, what: str) -> None:
    t0 = time.time()
    while not _done(d, identity):
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{d}: rank 0 did not finish the {what} in {timeout:.0f}s; see rank 0's log")
        time.sleep(1.0)


def _local_input(path: str, dest: Path) -> Path:
    """`path` itself when local, else the remote file or directory (--tokenizer, --vae) downloaded to `dest`."""
    if not storage.is_remote(path):
        return Path(path)
    if storage.list_tree(path):  # a prefix holding files: a VAE directory
        return _fetch(path, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(str(dest), storage.read_bytes(path))
    return dest


def _image_parts_fingerprint(opts: PrepareOptions) -> list[list[str]]:
    return [[kind, p.name, sources.part_fingerprint(p)] for kind in KINDS
            for p in sources.list_parts(getattr(opts, kind), opts.part_size)]


def caption_texts(inputs: list[str], kind: sources.SourceKind) -> Iterator[str]:
    """The text segments of image sources (captions; interleaved texts); unparseable records are left to
    precompute, which counts and names them."""
    for part in sources.list_parts(inputs):
        for rec in sources.read_part(part, kind):
            for seg_kind, val in rec.segments:
                if seg_kind == "text" and val:
                    yield str(val)


def tokenizer_stage(opts: PrepareOptions, place: Place) -> tuple[Path, dict]:
    """WORK/tokenizer/spm.model: trained on texts + captions (+ interleaved texts), or the given one wrapped;
    published to OUT/tokenizer for a remote out."""
    d = place.work / "tokenizer"
    model = d / "spm.model"
    given = _local_input(opts.tokenizer, place.work / "given" / "spm.model") if opts.tokenizer else None
    if given:
        identity = {"given": pack.file_sha256(given)}
    else:
        identity = {"texts": [sources.file_stamp(f) for f in sources.text_files(opts.texts)] if opts.texts else [],
                    "images": _image_parts_fingerprint(opts), "vocab_size": opts.vocab_size, "seed": opts.seed}
    if (have := _stage_done(place, "tokenizer", identity)) is not None:
        print(f"[prepare] tokenizer: {have / 'spm.model'} is done from the same inputs; skipped")
        return have / "spm.model", json.loads((have / DONE).read_text())
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    t0 = time.time()
    if given:
        shutil.copyfile(given, model)
        ids = tokenizer.wrap(model)
    else:
        skips = sources.SkipLog()

        def corpus() -> Iterator[str]:
            if opts.texts:
                yield from sources.iter_texts(opts.texts, skips)
            for kind in KINDS:
                yield from caption_texts(getattr(opts, kind), kind)

        ids = tokenizer.train(corpus(), model, vocab_size=opts.vocab_size, seed=opts.seed, skips=skips)
    rep = {"identity": identity, "vocab_size": ids.vocab_size, "seconds": round(time.time() - t0, 2)}
    _write_json(d / DONE, rep)
    if place.remote:
        _publish(d, place.at("tokenizer"))
    print(f"[prepare] tokenizer: {model} ({ids.vocab_size} ids) in {rep['seconds']:.0f}s")
    return model, rep


def vae_stage(opts: PrepareOptions, place: Place, recipe: VaeRecipe, rank: int) -> Path:
    """The VAE that encodes the images: --vae as given (fetched to WORK/given/vae when remote), else WORK/vae
    trained (rank 0) with `recipe` and, for a remote out, published to OUT/vae (the other ranks fetch it)."""
    if opts.vae:
        return _local_input(opts.vae, place.work / "given" / (f"vae.{rank}" if rank else "vae")).resolve()
    d = place.work / "vae"
    image_inputs = opts.pairs or opts.interleaved
    kind = "pairs" if opts.pairs else "interleaved"
    identity = {"images": [[p.name, sources.part_fingerprint(p)] for p in sources.list_parts(image_inputs)],
                "kind": kind, "image_size": opts.image_size, "recipe": asdict(recipe), "seed": opts.seed}
    if (have := _stage_done(place, "vae", identity, rank)) is not None:
        if rank == 0:
            print(f"[prepare] vae: {have} is done from the same images and recipe; skipped")
        return have
    if rank != 0:
        _wait_for(place.at("vae") if place.remote else d, identity, opts.wait_timeout, "VAE")
        return _stage_done(place, "vae", identity, rank) or d
    if d.exists():
        shutil.rmtree(d)
    t0 = time.time()
    skips = sources.SkipLog()
    data = vaelib.load_images(image_inputs, opts.image_size, recipe.max_images, kind, skips)  # (N, 3, S, S)
    if recipe.steps > 0:
        print(f"[prepare] vae: training {recipe.steps} steps on {len(data)} images of {opts.image_size} px "
              f"({recipe.downsample}x, {recipe.latent_channels} channels, width {recipe.width})", flush=True)
        settings = vaelib.VaeTrainSettings(
            steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, kl_weight=recipe.kl_weight,
            latent_channels=recipe.latent_channels, downsample=recipe.downsample, width=recipe.width,
            seed=opts.seed, sample_every=max(1, recipe.steps // 3), fg_weight=recipe.fg_weight,
            latent_noise=recipe.latent_noise)
        vaelib.train_vae(data, d, settings, report={"images_used": len(data), **skips.to_json("skipped")})
    else:
        model = vaelib.small_vae(recipe.latent_channels, downsample=recipe.downsample, width=recipe.width,
                                 seed=opts.seed)
        vaelib.save_with_stats(model, data[:256], d, {"random_init": True})
    _write_json(d / DONE, {"identity": identity, "seconds": round(time.time() - t0, 2), "images": len(data)})
    if place.remote:
        _publish(d, place.at("vae"))
    print(f"[prepare] vae: {d} in {time.time() - t0:.0f}s")
    return d


def precompute_stage(opts: PrepareOptions, place: Place, vae_dir: Path, rank: int, world: int) -> None:
    """OUT/latents/<kind> (local or remote): every rank encodes its parts; finished parts are kept (precompute's
    identity)."""
    for kind in KINDS:
        inputs = getattr(opts, kind)
        if not inputs:
            continue
        precompute.run(precompute.PrecomputeOptions(
            inputs, str(vae_dir), place.at("latents", kind), kind=kind, image_size=opts.image_size,
            batch_size=opts.batch_size, part_size=opts.part_size, decode_threads=opts.decode_threads,
            wait_timeout=opts.wait_timeout), rank_and_world=(rank, world))


def _pack_one(popts: pack.PackOptions) -> dict:
    """pack.run, after removing a finished pack of other inputs (an upstream stage was redone)."""
    out = popts.out
    done = storage.join(out, "pack.json")
    if storage.exists(done) and storage.read_json(done).get("identity") != pack.pack_identity(popts):
        print(f"[prepare] {out}: packed from other inputs or options (an earlier stage was redone); repacking")
        storage.delete_tree(out)
    return pack.run(popts, rank_and_world=(0, 1))  # rank 0 alone packs here (the other ranks have returned)


def pack_stage(opts: PrepareOptions, place: Place, tok: Path, patch_size: int) -> dict[str, dict]:
    """OUT/shards/<kind>: each source packed into seq_len rows (train + val); returns the pack reports."""
    reports = {}
    for kind, inputs in (("text", opts.texts), ("pairs", [place.at("latents", "pairs")] if opts.pairs else []),
                         ("interleaved", [place.at("latents", "interleaved")] if opts.interleaved else [])):
        if inputs:
            reports[kind] = _pack_one(pack.PackOptions(kind, list(inputs), str(tok), place.at("shards", kind),
                                                       seq_len=opts.seq_len, patch_size=patch_size,
                                                       val_every=opts.val_every))
    return reports


def image_share(reports: dict[str, dict]) -> float | None:
    """The data.image_position_share to aim for: the paper's 0.5 where the streams can reach it, else 90% of
    the most image-heavy stream's share (a pair is its patches plus caption and markers: below 0.5 when the
    caption is longer than 4 positions); None (mix by size) with one stream or no images."""
    shares = [r["train"]["image_positions"] / max(1, r["train"]["positions"]) for r in reports.values()]
    if len(shares) < 2 or max(shares) == 0:
        return None
    if min(shares) < 0.5 <= max(shares):
        return 0.5
    return round(0.9 * max(shares), 3) if min(shares) < 0.9 * max(shares) else None


def val_captions(latents_dir: str | Path, val_every: int, n: int) -> list[str]:
    """The captions of the first `n` validation pairs (the documents pack sends to the val split)."""
    out: list[str] = []
    if val_every <= 0 or n <= 0:
        return out
    for i, s in enumerate(pack.read_mds(latents_dir)):
        if i % val_every == val_every - 1:
            out.append(" ".join(seg["text"] for seg in s["doc"] if "text" in seg))
            if len(out) >= n:
                break
    return out


def data_yaml(opts: PrepareOptions, place: Place, tok: Path, vae_dir: Path | str, reports: dict[str, dict],
              patch_size: int) -> dict:
    """The config fragment: `data:`, the `model:` keys the latents fix, `logging.sample_prompts` (model.vocab_size
    is not written: the trainer takes it from data.tokenizer, one source). Shards under a remote out are read in
    place (`remote:`, cached in WORK/cache)."""
    names = list(reports)
    share = image_share(reports) if opts.image_position_share == "auto" else opts.image_position_share

    def stream(k: str, split: str) -> dict:
        return {"name": k, ("remote" if place.remote else "local"): place.at("shards", k, split)}

    data: dict[str, Any] = {
        "tokenizer": str(tok), "vae": str(vae_dir), "seq_len": opts.seq_len, "cache_dir": str(place.work / "cache"),
        "streams": [stream(k, "train") for k in names],
        "val_streams": [stream(k, "val") for k in names
                        if opts.val_every > 0 and reports[k].get("val", {}).get("rows", 0) > 0],
        "image_position_share": share,
    }
    cfg: dict[str, Any] = {"data": data}
    image = next((r for r in reports.values() if r.get("latent_shape")), None)
    if image is not None:
        C, h, _ = image["latent_shape"]
        cfg["model"] = {"latent_channels": C, "latent_size": h, "patch_size": patch_size}
    if opts.pairs:
        prompts = val_captions(place.at("latents", "pairs"), opts.val_every, opts.sample_prompts)
        if prompts:
            cfg["logging"] = {"sample_prompts": prompts}
    return cfg


def val_warnings(reports: dict[str, dict], micro_batch: int = 2, ranks: int = 2) -> list[str]:
    """Validation splits too small for one micro-batch per rank of a small run (`ranks` x `micro_batch` rows:
    configs/tiny.yaml on 2 ranks); the trainer warns again with the run's own counts
    (`pretrain.train.loop.warn_small_val_streams`)."""
    need = micro_batch * ranks
    return [f"{k}: its validation split holds {r['val']['rows']} rows, fewer than {ranks} ranks x micro-batch "
            f"{micro_batch} = {need}: its validation loss rests on at most {r['val']['rows']} sequences; lower "
            "--val-every (every N-th document goes to validation) or give more documents"
            for k, r in reports.items() if 0 < r.get("val", {}).get("rows", need) < need]


def run(opts: PrepareOptions, rank_and_world: tuple[int, int] | None = None) -> Path | None:
    """Every stage for this rank; returns the local data.yaml on rank 0 (None on the others, which stop after
    their share of the encoding). Raises ValueError/FileNotFoundError naming the bad input or flag, and
    storage.StorageError naming the URL for an unreadable or unwritable remote."""
    if rank_and_world is None:
        env = detect_env()
        rank, world = env.rank, env.world_size
    else:
        rank, world = rank_and_world
    t0 = time.time()
    out = opts.out if storage.is_remote(opts.out) else str(Path(opts.out).resolve())
    place = Place(out, Path(opts.local or out).resolve())
    place.work.mkdir(parents=True, exist_ok=True)
    recipe = opts.recipe or vae_recipe(opts.image_size)
    patch_size = opts.patch_size or recipe.patch_size
    if opts.vae:
        vae_meta = storage.read_json(storage.join(opts.vae, "config.json"))
        ds = 2 ** (len(vae_meta.get("block_out_channels", [1])) - 1)
    else:
        ds = recipe.downsample
    if (opts.pairs or opts.interleaved) and (opts.image_size % ds or (opts.image_size // ds) % patch_size):
        raise ValueError(f"--image-size {opts.image_size}: the VAE's {ds}x downsampling gives a "
                         f"{opts.image_size / ds:g}-wide latent, not divisible by --patch-size {patch_size}")
    times: dict[str, float] = {}
    tok, tok_rep = (None, None)
    if rank == 0:
        tok, tok_rep = tokenizer_stage(opts, place)
        times["tokenizer"] = time.time() - t0
    vae_dir: Path | None = None
    if opts.pairs or opts.interleaved:
        t = time.time()
        vae_dir = vae_stage(opts, place, recipe, rank)
        times["vae"] = time.time() - t
        t = time.time()
        precompute_stage(opts, place, vae_dir, rank, world)
        times["precompute"] = time.time() - t
    elif opts.vae:
        vae_dir = _local_input(opts.vae, place.work / "given" / "vae").resolve()
    if rank != 0:
        return None
    t = time.time()
    reports = pack_stage(opts, place, tok, patch_size)
    times["pack"] = time.time() - t
    cfg = data_yaml(opts, place, tok, vae_dir or "", reports, patch_size)
    path = place.work / "data.yaml"
    cli = sys.argv and sys.argv[0].endswith("prepare.py")
    cmd = "python -m data_pipeline.prepare " + shlex.join(sys.argv[1:]) if cli else "data_pipeline.prepare"
    text = (f"# written by {cmd}\n# use: python -m pretrain.train --config configs/tiny.yaml,{path}\n"
            f"# model.vocab_size = {tok_rep['vocab_size']}: set by data.tokenizer (the trainer reads it there)\n")
    if place.remote:
        text += (f"# the shards are read from {place.out}; data.tokenizer, data.vae and data.cache_dir are local to "
                 f"the machine that wrote this: on another, run the same command with --local DIR there (every stage "
                 f"is skipped, the tokenizer and VAE fetched)\n")
    storage.write_bytes(str(path), (text + yaml.safe_dump(cfg, sort_keys=False)).encode())
    for w in val_warnings(reports):
        print(f"[prepare] warning: {w}", file=sys.stderr)
    summary = {k: {"rows": r["train"]["rows"], "val_rows": r.get("val", {}).get("rows", 0),
                   "efficiency": r["train"]["efficiency"]} for k, r in reports.items()}
    record = {"seconds": {k: round(v, 1) for k, v in times.items()}, "streams": summary}
    _write_json(place.work / "prepare.json", record)
    if place.remote:
        storage.upload_file(path, place.at("data.yaml"))
        storage.write_json(place.at("prepare.json"), record)
    print(f"[prepare] {path} in {time.time() - t0:.0f}s (stage seconds "
          f"{json.dumps({k: round(v, 1) for k, v in times.items()})}; "
          f"streams {json.dumps(summary)})" + (f"; shards and stage records under {place.out}" if place.remote else ""))
    return path


def build_parser() -> argparse.ArgumentParser:
    """The CLI; defaults are PrepareOptions' and VaeRecipe's (its flags override the image size's recipe)."""
    d, r = PrepareOptions(out="", texts=["-"]), VaeRecipe()
    table = getattr(vaelib, "recipe_table", None)
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=(f"VAE recipes by image size (--vae-* flags override a field):\n{table()}"
                                         if table else None))
    ap.add_argument("--out", required=True,
                    help="output directory or object-storage prefix (s3://bucket/prefix; needs --local); stages "
                         "resume there")
    ap.add_argument("--local", default="",
                    help="with a remote --out: local directory for the tokenizer, the VAE, data.yaml and the stream "
                         "cache (default: --out itself, which must then be local)")
    ap.add_argument("--text", dest="texts", nargs="+", default=[],
                    help="text .jsonl/.txt files, folders or quoted globs")
    ap.add_argument("--pairs", nargs="+", default=[],
                    help="image-caption .jsonl ({'image': path, 'caption': str}), image folders with caption files, or "
                         ".tar")
    ap.add_argument("--interleaved", nargs="+", default=[],
                    help="interleaved .jsonl ({'segments': [{'text'}|{'image'}]})")
    ap.add_argument("--image-size", type=int, default=d.image_size, help=f"pixels (square) (default: {d.image_size})")
    ap.add_argument("--seq-len", type=int, default=d.seq_len, help=f"positions per packed row (default: {d.seq_len})")
    ap.add_argument("--tokenizer", default="",
                    help="an existing sentencepiece .model (default: train one on texts + captions)")
    ap.add_argument("--vocab-size", type=int, default=d.vocab_size,
                    help=f"pieces of a trained tokenizer (default: {d.vocab_size})")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--vae", default="", help="an existing diffusers AutoencoderKL directory (default: train one)")
    g.add_argument("--train-vae", action="store_true", help="train a VAE on the images (the default without --vae)")
    ap.add_argument("--patch-size", type=int, default=None, help="latent patch size (default: the recipe's, 2)")
    for name in ("steps", "latent_channels", "downsample", "width", "batch_size", "max_images"):
        ap.add_argument(f"--vae-{name.replace('_', '-')}", type=int, default=None,
                        help=f"VAE recipe override (default for this image size; generic: {getattr(r, name)})")
    for name in ("lr", "fg_weight", "latent_noise"):
        ap.add_argument(f"--vae-{name.replace('_', '-')}", type=float, default=None,
                        help=f"VAE recipe override (generic default: {getattr(r, name)})")
    ap.add_argument("--val-every", type=int, default=d.val_every,
                    help=f"every N-th document of each source goes to validation; 0 = none (default: {d.val_every})")
    ap.add_argument("--image-position-share", type=float, default=None,
                    help="data.image_position_share (default: 0.5 when the streams reach it, else 90%% of the "
                         "image-heaviest)")
    ap.add_argument("--sample-prompts", type=int, default=d.sample_prompts,
                    help=f"validation captions written to logging.sample_prompts (default: {d.sample_prompts})")
    ap.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    ap.add_argument("--part-size", type=int, default=d.part_size,
                    help=f"records per precompute part (default: {d.part_size})")
    ap.add_argument("--batch-size", type=int, default=d.batch_size,
                    help=f"images per VAE forward in precompute (default: {d.batch_size})")
    ap.add_argument("--decode-threads", type=int, default=d.decode_threads, help=f"(default: {d.decode_threads})")
    return ap


def options_from_args(a: argparse.Namespace) -> PrepareOptions:
    """PrepareOptions of parsed CLI flags (the recipe: the image size's, with the --vae-* flags over it)."""
    recipe = vae_recipe(a.image_size)
    over = {f.name: getattr(a, f"vae_{f.name}") for f in dataclasses.fields(VaeRecipe)
            if getattr(a, f"vae_{f.name}", None) is not None}
    recipe = dataclasses.replace(recipe, **over)
    share = "auto" if a.image_position_share is None else a.image_position_share
    return PrepareOptions(out=a.out, local=a.local, texts=a.texts, pairs=a.pairs, interleaved=a.interleaved,
                          image_size=a.image_size, seq_len=a.seq_len, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                          vae=a.vae, recipe=recipe,
                          patch_size=a.patch_size, val_every=a.val_every, image_position_share=share,
                          sample_prompts=a.sample_prompts, seed=a.seed, part_size=a.part_size, batch_size=a.batch_size,
                          decode_threads=a.decode_threads)


def main(argv: list[str] | None = None) -> None:
    """CLI: prepare a data set (see --help)."""
    try:
        opts = options_from_args(build_parser().parse_args(argv))
    except ValueError as e:
        raise SystemExit(f"data_pipeline.prepare: {e}") from e
    run(opts)


if __name__ == "__main__":
    main()
