"""`python -m data_pipeline.prepare`: one command from a user's files to data.yaml, stages resumed; the trainer's
start-up check of the model keys the data fixes (each mismatch named with its key, before DeepSpeed starts)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from data_pipeline import prepare, storage
from data_pipeline.synthetic import write_demo_sources

REPO = Path(__file__).resolve().parents[1]


def _sources(root: Path, pairs: int = 60) -> dict:
    return write_demo_sources(root / "raw", seed=1, n_pairs=pairs, n_texts=80, n_interleaved=12, size=32)


def _opts(raw: dict, out: Path, **kw) -> prepare.PrepareOptions:
    base = dict(out=str(out), texts=[str(raw["texts"])], pairs=[str(raw["pairs"])],
                interleaved=[str(raw["interleaved"])],
                image_size=32, seq_len=128, vocab_size=300, part_size=25, decode_threads=1,
                recipe=prepare.VaeRecipe(steps=0, latent_channels=4, downsample=4, width=8, patch_size=2))
    return prepare.PrepareOptions(**{**base, **kw})


def test_data_yaml_holds_what_the_shards_fix_and_reruns_skip_every_stage(tmp_path: Path, capsys) -> None:
    """data.yaml's model keys are read back from the shards' pack.json and the VAE (independent sources); the
    trainer's config loads from tiny.yaml + data.yaml alone; a rerun redoes nothing; a new vocabulary
    retrains the tokenizer and repacks, but keeps the VAE and the latents."""
    from contract.special_ids import load_special_ids
    from data_pipeline.vae import load_vae
    from pretrain.config import load_config
    from pretrain.plan.data_keys import data_key_problems

    raw = _sources(tmp_path)
    out = tmp_path / "data"
    path = prepare.run(_opts(raw, out), rank_and_world=(0, 1))
    cfg = yaml.safe_load(path.read_text())
    pairs = json.loads((out / "shards" / "pairs" / "pack.json").read_text())
    vae = load_vae(cfg["data"]["vae"])
    assert pairs["latent_shape"] == [vae.latent_channels, 32 // vae.downsample, 32 // vae.downsample] == [4, 8, 8]
    assert cfg["model"] == {"latent_channels": 4, "latent_size": 8, "patch_size": pairs["patch_size"]}
    assert [s["name"] for s in cfg["data"]["streams"]] == ["text", "pairs", "interleaved"]
    captions = [json.loads(x)["caption"] for x in Path(raw["pairs"]).read_text().splitlines()]
    assert cfg["logging"]["sample_prompts"] == [captions[9], captions[19], captions[29], captions[39]]  # val docs
    # the tokenizer saw the captions: each caption word is one piece or a few, never bytes
    run_cfg = load_config([REPO / "configs/tiny.yaml", path], [f"train.run_dir={tmp_path / 'run'}"])
    assert run_cfg.model.vocab_size == load_special_ids(out / "tokenizer" / "spm.model").vocab_size
    assert data_key_problems(run_cfg) == []
    assert 0 < run_cfg.data.image_position_share <= 0.5
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")
              if p.is_file() and p.suffix in (".model", ".mds", ".safetensors")}
    capsys.readouterr()
    prepare.run(_opts(raw, out), rank_and_world=(0, 1))
    said = capsys.readouterr().out
    assert "tokenizer: " in said and "skipped" in said and said.count("nothing to do") == 3
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    prepare.run(_opts(raw, out, vocab_size=320), rank_and_world=(0, 1))
    said = capsys.readouterr().out
    assert "vae: " in said and said.count("repacking") == 3
    after = {p: p.stat().st_mtime_ns for p in stamps if p.exists()}
    assert [p for p in stamps if "latents" in p.parts and after.get(p) != stamps[p]] == []
    assert (out / "tokenizer" / "spm.model").stat().st_mtime_ns != stamps[out / "tokenizer" / "spm.model"]


def test_a_given_tokenizer_is_wrapped_and_texts_alone_need_no_vae(tmp_path: Path) -> None:
    from data_pipeline import tokenizer

    raw = _sources(tmp_path, pairs=10)
    own = tmp_path / "own" / "spm.model"
    tokenizer.train((json.loads(x)["text"] for x in Path(raw["texts"]).read_text().splitlines()), own, vocab_size=320)
    path = prepare.run(prepare.PrepareOptions(out=str(tmp_path / "d"), texts=[str(raw["texts"])], tokenizer=str(own),
                                              seq_len=128), rank_and_world=(0, 1))
    cfg = yaml.safe_load(path.read_text())
    assert Path(cfg["data"]["tokenizer"]).read_bytes() == own.read_bytes() and cfg["data"]["vae"] == ""
    assert "model" not in cfg and [s["name"] for s in cfg["data"]["streams"]] == ["text"]


def test_cli_help_shows_defaults_and_bad_sizes_are_named(tmp_path: Path) -> None:
    text = prepare.build_parser().format_help()
    assert "(default: 256)" in text and "(default: 4096)" in text and "generic: 2000" in text
    raw = _sources(tmp_path, pairs=4)
    with pytest.raises(ValueError, match="--image-size 36: the VAE's 4x downsampling gives a 9-wide latent"):
        prepare.run(_opts(raw, tmp_path / "d", image_size=36), rank_and_world=(0, 1))
    with pytest.raises(ValueError, match="nothing to prepare"):
        prepare.PrepareOptions(out=str(tmp_path))


@pytest.mark.slow
def test_two_ranks_write_what_one_rank_writes(tmp_path: Path) -> None:
    """Two processes (RANK/WORLD_SIZE, as torchrun or srun set them) share the encoding; latents and packs equal
    a one-process run's byte for byte."""
    raw = _sources(tmp_path, pairs=100)
    import torch

    threads = torch.get_num_threads()
    # as the two ranks below (OMP_NUM_THREADS=1): CPU convolutions differ by an ulp across thread counts
    torch.set_num_threads(1)
    try:
        one = prepare.run(_opts(raw, tmp_path / "one"), rank_and_world=(0, 1))
    finally:
        torch.set_num_threads(threads)
    code = ("from data_pipeline import prepare; import sys, json; sys.path.insert(0, %r); import test_prepare as t; "
            "raw = json.loads(sys.argv[1]); prepare.run(t._opts(raw, __import__('pathlib').Path(sys.argv[2])))")
    code = code % str(Path(__file__).parent)
    args = [json.dumps({k: str(v) for k, v in raw.items()}), str(tmp_path / "two")]
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                              "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "[precompute rank 1/2] 4 parts, 2 mine" in logs[1] and (tmp_path / "two" / "data.yaml").is_file()
    for kind in ("text", "pairs", "interleaved"):
        for split in ("train", "val"):
            a, b = tmp_path / "one" / "shards" / kind / split, tmp_path / "two" / "shards" / kind / split
            assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
            shards = list(a.rglob("*.mds"))  # pack writes <split>/part-K/shard.*.mds
            assert shards
            for f in shards:
                assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f
    assert one.is_file()


def _run_trainer(config: str, *overrides: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """The trainer as a user starts it; returns (result, wall seconds, the child's CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", config, *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, time.time() - t0, cpu


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    from data_pipeline import tokenizer

    path = tmp_path_factory.mktemp("tok") / "other.model"
    tokenizer.train([f"entirely different words number {i} of another corpus" for i in range(200)], path,
                    vocab_size=320)
    return path


KEYS = [("model.latent_channels=4", "set model.latent_channels=8"), ("model.latent_size=4", "set model.latent_size=8"),
        ("model.patch_size=4", "set model.patch_size=2"), ("data.tokenizer=OTHER", "set data.tokenizer=")]


@pytest.mark.parametrize("override,fix", KEYS, ids=[k[0].split("=")[0] for k in KEYS])
def test_a_model_key_the_shards_disagree_with_stops_the_trainer_in_seconds(demo_data, other_tokenizer, tmp_path: Path,
                                                                           override: str, fix: str) -> None:
    """Each of the four keys: the trainer exits non-zero before DeepSpeed is imported, naming the key and its value.
    Time is the child's CPU seconds (the machine's load stretches wall time; CPU time does not): < 10 s."""
    override = override.replace("OTHER", str(other_tokenizer))
    done, wall, cpu = _run_trainer(f"{REPO / 'configs/tiny.yaml'},{demo_data.config_path}",
                                   f"train.run_dir={tmp_path / 'run'}", override)
    out = done.stdout + done.stderr
    print(f"{override}: exit {done.returncode} after {wall:.1f} s wall, {cpu:.1f} s CPU")
    assert done.returncode != 0 and fix in out, out[-3000:]
    if "tokenizer" in override:
        assert f"set data.tokenizer={demo_data.tokenizer}" in out
    assert "deepspeed" not in out.lower() and not (tmp_path / "run").exists(), out[-3000:]
    assert cpu < 10.0, f"{cpu:.1f} CPU seconds"


def test_dry_run_lists_every_key_to_set(demo_data, other_tokenizer, tmp_path: Path) -> None:
    done, _, _ = _run_trainer(f"{REPO / 'configs/tiny.yaml'},{demo_data.config_path}", "--nodes", "1",
                              "--gpus-per-node", "2", "train.dry_run=true",
                              *[k.replace("OTHER", str(other_tokenizer)) for k, _ in KEYS])
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    for _, fix in KEYS:
        assert fix in done.stdout, done.stdout
    assert "repack with matching --patch-size" not in done.stdout


def test_a_validation_stream_smaller_than_a_batch_per_rank_is_named(demo_data, caplog) -> None:
    from pretrain.config import load_config
    from pretrain.plan.data_keys import small_val_streams

    cfg = load_config([REPO / "configs/tiny.yaml", demo_data.config_path])
    rows = {s.name: json.loads((Path(s.local) / "pack.json").read_text())["rows"] for s in cfg.data.val_streams}
    warned = small_val_streams(cfg, micro_batch=4, world_size=2)
    assert len(warned) == sum(n < 8 for n in rows.values()) > 0
    small = next(k for k, n in rows.items() if n < 8)
    want = f"({small}) holds {rows[small]} rows, fewer than 2 ranks x train.micro_batch_size 4 = 8"
    assert any(want in w for w in warned)
    assert small_val_streams(cfg, micro_batch=1, world_size=1) == []
    from pretrain.train.loop import warn_small_val_streams

    with caplog.at_level("WARNING", logger="pretrain"):
        assert warn_small_val_streams(cfg, micro_batch=4, world_size=2) == warned
    assert want in caplog.text


def test_cadence_follows_train_steps_unless_set() -> None:
    """tiny.yaml sets no cadence: 50 steps checkpoint/validate/sample every 10/5/12, 3,000 steps every 600/300/750
    (5 checkpoints, not the 120 of a fixed 25); a set value, 0 included, stays; a negative one is refused."""
    from pretrain.config import load_config
    from pretrain.configlib import ConfigError

    def every(*o: str) -> tuple:
        c = load_config(REPO / "configs/tiny.yaml", list(o))
        return c.checkpoint.every, c.logging.val_every, c.logging.sample_every

    assert every() == (10, 5, 12)
    assert every("train.steps=3000") == (600, 300, 750)
    assert every("train.steps=3", "logging.sample_every=0", "checkpoint.every=7") == (7, 1, 0)
    with pytest.raises(ConfigError, match=r"logging.val_every=-1: must be >= 0 .*train.steps // 10"):
        load_config(REPO / "configs/tiny.yaml", ["logging.val_every=-1"])


def _pairs_tar(raw: dict, tar: Path) -> Path:
    """The pairs of `raw` as a webdataset tar (KEY.png + KEY.txt), the form of a remote image input."""
    import tarfile

    with tarfile.open(tar, "w") as tf:
        for i, line in enumerate(Path(raw["pairs"]).read_text().splitlines()):
            rec = json.loads(line)
            tf.add(Path(raw["pairs"]).parent / rec["image"], arcname=f"{i:06d}.png")
            cap = tar.parent / "caption.txt"
            cap.write_text(rec["caption"])
            tf.add(cap, arcname=f"{i:06d}.txt")
    return tar


def _objects(s3, prefix: str) -> dict[str, tuple]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for page in pages for o in page.get("Contents", [])}


def test_a_bucket_in_and_out_matches_a_local_run_and_another_machine_fetches_what_it_needs(tmp_path: Path, s3,
                                                                                          capsys) -> None:
    """Texts and an image tar read from a bucket; latents, shards and every stage record written under a prefix.
    The shards equal those of a local run on the same inputs byte for byte; data.yaml reads them in place and
    passes the trainer's key check; a rerun skips every stage and rewrites no shard or weight (the index and report
files it rewrites hold the same bytes); the same command with another
    --local (another machine) skips every stage too and fetches the very tokenizer and VAE."""
    from pretrain.config import load_config
    from pretrain.plan.data_keys import data_key_problems

    raw = _sources(tmp_path)
    tar = _pairs_tar(raw, tmp_path / "pairs.tar")
    storage.upload_file(raw["texts"], s3.url("in", "texts.jsonl"))
    storage.upload_file(tar, s3.url("in", "pairs.tar"))
    local = _opts(raw, tmp_path / "local", texts=[str(raw["texts"])], pairs=[str(tar)], interleaved=[])
    prepare.run(local, rank_and_world=(0, 1))

    def remote(machine: str) -> prepare.PrepareOptions:
        return _opts(raw, s3.url("out"), local=str(tmp_path / machine), texts=[s3.url("in", "texts.jsonl")],
                     pairs=[s3.url("in", "pairs.tar")], interleaved=[])

    with pytest.raises(ValueError, match="--local DIR"):
        _opts(raw, s3.url("out"))
    path = prepare.run(remote("m1"), rank_and_world=(0, 1))
    assert path == tmp_path / "m1" / "data.yaml"
    assert storage.list_dir(s3.url("out")) == ["data.yaml", "latents", "prepare.json", "shards", "tokenizer", "vae"]
    for kind in ("text", "pairs"):
        for split in ("train", "val"):
            theirs = {r: storage.read_bytes(storage.join(s3.url("out", "shards", kind, split), r))
                      for r in storage.list_tree(s3.url("out", "shards", kind, split)) if r.endswith(".mds")}
            mine = tmp_path / "local" / "shards" / kind / split
            assert theirs and theirs == {p.relative_to(mine).as_posix(): p.read_bytes() for p in mine.rglob("*.mds")}
    cfg = yaml.safe_load(path.read_text())
    assert cfg["data"]["streams"] == [{"name": k, "remote": s3.url("out", "shards", k, "train")}
                                      for k in ("text", "pairs")]
    assert cfg["data"]["tokenizer"] == str(tmp_path / "m1" / "tokenizer" / "spm.model")
    assert storage.read_bytes(s3.url("out", "data.yaml")) == path.read_bytes()
    run_cfg = load_config([REPO / "configs/tiny.yaml", path], [f"train.run_dir={tmp_path / 'run'}"])
    assert data_key_problems(run_cfg) == []

    written = _objects(s3, "out/")
    capsys.readouterr()
    prepare.run(remote("m1"), rank_and_world=(0, 1))
    said = capsys.readouterr().out
    assert "tokenizer: " in said and "vae: " in said and said.count("is done from the same") == 2, said
    again = _objects(s3, "out/")
    same = [k for k in written if k != "out/prepare.json"]  # that one records this run's stage times
    assert {k: again[k][0] for k in same} == {k: written[k][0] for k in same} and again.keys() == written.keys()
    assert {k: v for k, v in again.items() if k.endswith((".mds", ".model", ".safetensors"))} == \
        {k: v for k, v in written.items() if k.endswith((".mds", ".model", ".safetensors"))}  # none rewritten
    prepare.run(remote("m2"), rank_and_world=(0, 1))
    said = capsys.readouterr().out
    assert said.count("fetched to") == 2 and said.count("is done from the same") == 2, said
    for rel in ("tokenizer/spm.model", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "m2" / rel).read_bytes() == (tmp_path / "m1" / rel).read_bytes(), rel
    assert {k: v for k, v in _objects(s3, "out/").items() if k.endswith((".mds", ".model", ".safetensors"))} == \
        {k: v for k, v in written.items() if k.endswith((".mds", ".model", ".safetensors"))}, said
    assert yaml.safe_load((tmp_path / "m2" / "data.yaml").read_text())["data"]["vae"] == str(tmp_path / "m2" / "vae")
