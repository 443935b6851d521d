"""Object storage against a real S3 API (moto's server mode on loopback, tests/conftest.py `s3`).

Quick: data_pipeline.storage round trips and its errors (missing bucket, missing object, wrong
credentials), each naming the URL and what to do. Slow: the demo data precomputed and packed into a
bucket, and training from it through a bounded cache (see the tests below).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import storage
from data_pipeline.config import StreamConfig
from data_pipeline.loader import build_loader, pack_info


def _moto_auth(endpoint: str, count: str) -> None:
    """Switch moto's credential checks on (after `count` free requests: "0") or off ("inf")."""
    req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=count.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).read()


def test_storage_round_trip(s3, tmp_path):
    """Write, list, read back, exists; the same calls on a local directory give the same answers."""
    for root in (s3.url("ds"), str(tmp_path / "ds")):
        storage.write_json(storage.join(root, "meta.json"), {"a": 1})
        storage.write_bytes(storage.join(root, "train", "shard.00000.mds"), b"\x00" * 3000)
        assert storage.list_dir(root) == ["meta.json", "train"]
        assert storage.read_json(storage.join(root, "meta.json")) == {"a": 1}
        with storage.open_read(storage.join(root, "train", "shard.00000.mds")) as f:
            assert f.read(10) == b"\x00" * 10 and len(f.read()) == 2990  # streamed in pieces
        assert storage.exists(storage.join(root, "meta.json")) and not storage.exists(storage.join(root, "nope"))
        assert storage.parent(storage.join(root, "train")) == root
        assert storage.list_tree(root) == ["meta.json", "train/shard.00000.mds"]
    # a tree local -> bucket -> local comes back byte for byte; delete_tree empties the prefix
    src = tmp_path / "tree"
    for rel, data in {"a.json": b"{}", "sub/b.bin": bytes(range(256)) * 50, "sub/deeper/c.txt": b"c"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    assert storage.copy_tree(src, s3.url("tree"), skip=("a.json",)) == ["sub/b.bin", "sub/deeper/c.txt"]
    assert storage.copy_tree(src, s3.url("tree")) == ["a.json", "sub/b.bin", "sub/deeper/c.txt"]
    storage.copy_tree(s3.url("tree"), tmp_path / "back")
    assert {p.relative_to(tmp_path / "back"): p.read_bytes() for p in (tmp_path / "back").rglob("*") if p.is_file()} \
        == {p.relative_to(src): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    assert storage.delete_tree(s3.url("tree")) == 3 and storage.list_tree(s3.url("tree")) == []
    assert storage.list_tree(s3.url("ds")) == ["meta.json", "train/shard.00000.mds"]  # a neighbour is untouched


def test_storage_errors_name_the_url_and_what_to_do(s3):
    """A missing bucket, a missing object and wrong credentials: StorageError naming the URL and the remedy."""
    storage.write_bytes(s3.url("a"), b"x")
    with pytest.raises(storage.StorageError,
                       match=r"s3://no-such-bucket-x/a: bucket 'no-such-bucket-x' does not exist.*create it"):
        storage.read_bytes("s3://no-such-bucket-x/a")
    with pytest.raises(storage.StorageError, match=r"does not exist.*create it"):
        storage.exists("s3://no-such-bucket-x/a")  # a missing bucket is not "absent": it must not be redone silently
    with pytest.raises(storage.StorageError, match=rf"{s3.url('b')}: no such object.*run the stage that writes it"):
        storage.read_bytes(s3.url("b"))
    iam = __import__("boto3").client("iam", endpoint_url=s3.endpoint, region_name="us-east-1",
                                     aws_access_key_id="testing", aws_secret_access_key="testing")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    _moto_auth(s3.endpoint, "0")
    try:
        with pytest.raises(storage.StorageError,
                           match=rf"{s3.url('a')}: access denied.*check the credentials in AWS_ACCESS_KEY_ID"):
            storage.read_bytes(s3.url("a"))  # the fixture's keys are unknown to the server now
        with pytest.MonkeyPatch.context() as mp:  # the real keys read it: the check is the credentials, not the test
            mp.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
            mp.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
            assert storage.read_bytes(s3.url("a")) == b"x"
    finally:
        _moto_auth(s3.endpoint, "inf")


def _first_batches(demo, cache: Path, n: int = 3, cache_limit: str | None = None, **stream) -> list:
    """Token tensors of the first `n` micro-batches (2 rows, no shuffle) of one stream."""
    cfg = dataclasses.replace(demo.data_config, cache_dir=str(cache), shuffle=False, num_workers=0,
                              cache_limit=cache_limit,
                              image_position_share=None, streams=[StreamConfig(name="s", **stream)])
    ld = build_loader(cfg, "train", micro_batch_size=2, seed=0, patch_size=demo.patch_size,
                      latent_shape=demo.latent_shape, diffusion_steps=1000)
    out = [b.tokens.clone() for b in itertools.islice(ld, n)]
    del ld
    gc.collect()
    return out


def _cached_shards(cache: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in cache.rglob("*.mds")}


def test_stream_cache_is_bound_to_what_it_caches(demo_data, tmp_path, monkeypatch):
    """Issue 27 item 3. One data.cache_dir and stream name, two remotes: the second launch trains on its own
    remote (it trained on the first remote's cached shards when the cache was named after the launcher's
    port); a relaunch of the first (another port, another torchrun run id) downloads nothing again."""
    remotes = {s.name: s.local for s in demo_data.data_config.streams}
    a, b = remotes["pairs"], remotes["interleaved"]
    cache = tmp_path / "cache"
    monkeypatch.setenv("MASTER_PORT", "29500")
    first_a = _first_batches(demo_data, cache, remote=a)
    before = _cached_shards(cache)
    assert before
    monkeypatch.setenv("MASTER_PORT", "29501")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "relaunch")
    again_a = _first_batches(demo_data, cache, remote=a)
    assert all(torch.equal(x, y) for x, y in zip(first_a, again_a))
    assert _cached_shards(cache) == before, "the relaunch downloaded the shards again into a new folder"
    got_b = _first_batches(demo_data, cache, remote=b)
    want_b = _first_batches(demo_data, tmp_path / "fresh", remote=b)
    direct_b = _first_batches(demo_data, tmp_path / "unused", local=b)
    assert all(torch.equal(x, y) for x, y in zip(want_b, direct_b))
    assert not all(torch.equal(x, y) for x, y in zip(got_b, first_a)), "served the first remote's cached shards"
    assert all(torch.equal(x, y) for x, y in zip(got_b, want_b))


def _upload_tree(local: Path, url: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            storage.upload_file(p, storage.join(url, *p.relative_to(local).parts))


def _loader_error(demo, cache: Path, remote: str) -> str:
    with pytest.raises((storage.StorageError, RuntimeError)) as e:
        _first_batches(demo, cache, n=1000, remote=remote)
    return str(e.value)


def test_cache_limit_refuses_streams_read_in_place(demo_data, tmp_path):
    """streaming evicts by deleting shard files: a cache limit over a local stream would delete the data set."""
    local = next(s.local for s in demo_data.data_config.streams if s.name == "pairs")
    with pytest.raises(ValueError,
                       match=r"data.cache_limit='1mb' with local streams \['s'\].*give those streams a `remote`"):
        _first_batches(demo_data, tmp_path / "c", local=local, cache_limit="1mb")
    assert len(_first_batches(demo_data, tmp_path / "c", remote=local, cache_limit="1mb")) == 3
    assert list(Path(local).rglob("*.mds"))


def test_loader_errors_from_a_bucket_name_the_url_and_what_to_do(demo_data, s3, tmp_path):
    """Training from a bucket: a missing bucket, a missing object, wrong credentials and a truncated shard
    each stop the loader with the URL and the remedy; nothing is skipped."""
    pairs = Path(next(s.local for s in demo_data.data_config.streams if s.name == "pairs"))
    _upload_tree(pairs.parent, s3.url("pairs"))
    assert len(_first_batches(demo_data, tmp_path / "ok", remote=s3.url("pairs", "train"))) == 3
    msgs = {"missing bucket": _loader_error(demo_data, tmp_path / "c1", "s3://no-such-bucket-y/pairs/train"),
            "missing object": _loader_error(demo_data, tmp_path / "c2", s3.url("nothing", "train"))}
    assert re.search(r"s3://no-such-bucket-y/pairs/train/\w+.json: bucket 'no-such-bucket-y' does not exist.*create it",
                     msgs["missing bucket"]), msgs
    assert re.search(rf"{s3.url('nothing', 'train', 'index.json')}: no such object.*run the stage that writes it",
                     msgs["missing object"]), msgs
    _moto_auth(s3.endpoint, "0")
    try:
        msgs["wrong credentials"] = _loader_error(demo_data, tmp_path / "c3", s3.url("pairs", "train"))
    finally:
        _moto_auth(s3.endpoint, "inf")
    assert re.search(r"/pairs/train/\w+.json: access denied.*check the credentials", msgs["wrong credentials"]), msgs
    shard = sorted(pairs.rglob("*.mds"))[0]
    url = storage.join(s3.url("pairs"), *shard.relative_to(pairs.parent).parts)
    storage.write_bytes(url, shard.read_bytes()[: shard.stat().st_size // 2])
    msgs["truncated shard"] = _loader_error(demo_data, tmp_path / "c4", s3.url("pairs", "train"))
    assert msgs["truncated shard"].startswith(f"{url}: corrupt or truncated shard"), msgs
    assert "re-run data_pipeline.pack to that remote" in msgs["truncated shard"], msgs
    print("\n" + "\n".join(f"{k}: {v}" for k, v in msgs.items()))


def test_dry_run_reads_remote_streams_in_place(demo_data, s3, tmp_path):
    """The dry run checks a remote stream's index.json and pack.json (seq_len, tokenizer) in the bucket."""
    import yaml

    from pretrain.config import load_config
    from pretrain.plan.dry_run import check_data

    pairs = Path(next(s.local for s in demo_data.data_config.streams if s.name == "pairs"))
    _upload_tree(pairs.parent, s3.url("pairs"))

    def problems(train: str, *overrides: str) -> list[str]:
        data = {"streams": [{"name": "pairs", "remote": train}], "image_position_share": None,
                "val_streams": [{"name": "pairs", "remote": s3.url("pairs", "val")}]}
        (tmp_path / "s3.yaml").write_text(yaml.safe_dump({"data": data}))
        return check_data(load_config([Path(__file__).parents[1] / "configs/tiny.yaml", demo_data.config_path,
                                       tmp_path / "s3.yaml"], list(overrides)))

    assert problems(s3.url("pairs", "train")) == []
    (p,) = problems(s3.url("pairs", "train"), "data.seq_len=128")
    assert "packed with seq_len=256 but data.seq_len=128" in p, p
    (p,) = problems(s3.url("nothing", "train"))
    assert (f"{s3.url('nothing', 'train', 'index.json')} not found; pack the source with data_pipeline.pack "
            "to that remote") in p, p
    (p,) = problems("s3://no-such-bucket-z/pairs/train")
    assert "bucket 'no-such-bucket-z' does not exist" in p, p


# ------------------------------------------------------------------------------------------ slow


def _s3_files(s3, prefix: str) -> dict[str, bytes]:
    """Every object under s3://bucket/prefix/, by its path relative to the prefix."""
    c, out = s3.client(), {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = c.get_object(Bucket=s3.bucket, Key=o["Key"])["Body"].read()
    return out


def _local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pack(demo, kind: str, inputs: list[str], out: str, shard_size: int) -> dict:
    from data_pipeline import pack

    return pack.run(pack.PackOptions(kind=kind, inputs=inputs, tokenizer=str(demo.tokenizer), out=out,
                                     seq_len=demo.data_config.seq_len, patch_size=demo.patch_size, val_every=10,
                                     shard_size=shard_size), rank_and_world=(0, 1))


@pytest.mark.slow
def test_demo_data_precomputed_and_packed_into_a_bucket(demo_data, s3, tmp_path, capsys):
    """Precompute reads a webdataset tar streamed from the bucket and writes its latents there; pack reads
    those and writes its shards there. Against the same stages on local files: the latents hold the same
    values and the packed shards and indexes are byte-identical; a rerun against the bucket finds its parts
    done (the resume check reads the remote reports)."""
    import io
    import tarfile

    from data_pipeline import precompute
    from data_pipeline.pack import read_mds

    raw = demo_data.root / "raw"
    with tarfile.open(tmp_path / "pairs.tar", "w") as tf:  # 48 pairs as img2dataset writes them
        for i, line in enumerate(list(open(raw / "pairs.jsonl"))[:48]):
            r = json.loads(line)
            for name, data in ((f"{i:06d}.png", (raw / r["image"]).read_bytes()),
                               (f"{i:06d}.txt", r["caption"].encode())):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    storage.upload_file(tmp_path / "pairs.tar", s3.url("raw", "pairs.tar"))
    size = storage.read_json(storage.join(str(demo_data.root / "latents" / "pairs"), "latents.json"))["image_size"]

    def pre(src: str, out: str) -> None:
        precompute.run(precompute.PrecomputeOptions([src], str(demo_data.vae), out, kind="pairs", image_size=size,
                                                    part_size=16, batch_size=16, decode_threads=1, shard_size=1 << 14),
                       rank_and_world=(0, 1))

    pre(str(tmp_path / "pairs.tar"), str(tmp_path / "latents"))
    pre(s3.url("raw", "pairs.tar"), s3.url("latents"))
    capsys.readouterr()
    pre(s3.url("raw", "pairs.tar"), s3.url("latents"))
    assert "already done" in capsys.readouterr().out
    remote = _s3_files(s3, "latents")
    assert sorted(remote) == sorted(_local_files(tmp_path / "latents"))
    a, b = list(read_mds(tmp_path / "latents")), list(read_mds(s3.url("latents")))
    assert len(a) == 48 and [x["doc"] for x in a] == [x["doc"] for x in b]
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x if k not in ("key", "doc"))
    assert all(y["key"].startswith(s3.url("raw", "pairs.tar")) for y in b)  # records named by their remote source
    _pack(demo_data, "pairs", [str(tmp_path / "latents")], str(tmp_path / "packed"), 1 << 14)
    _pack(demo_data, "pairs", [s3.url("latents")], s3.url("packed"), 1 << 14)
    local, remote = _local_files(tmp_path / "packed"), _s3_files(s3, "packed")
    assert sorted(local) == sorted(remote)
    shards = [k for k in local if k.endswith(".mds") or k.endswith("index.json")]
    assert len(shards) > 3 and all(local[k] == remote[k] for k in shards), [k for k in shards if local[k] != remote[k]]
    info = pack_info(s3.url("packed", "train"))  # the loader's and dry run's reader, from the remote
    assert info["rows"] == json.loads(local["train/pack.json"])["rows"] and info["identity"]["kind"] == "pairs"


def _train(demo, run_dir: Path, data_yaml: Path, *overrides: str, fault: str = "") -> int:
    """`python -m pretrain.train` on 2 gloo ranks (torchrun, real DeepSpeed ZeRO-3) with the e2e tests' small run."""
    import subprocess
    import sys

    from contract.dist_env import free_port
    from test_train_e2e import REPO, RUN_OVERRIDES, TIMEOUT, run_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pretrain.train", "--config", f"{REPO / 'configs/tiny.yaml'},{demo.config_path},{data_yaml}",
           f"train.run_dir={run_dir}", f"data.cache_dir={run_dir}/cache", *RUN_OVERRIDES, "train.steps=6",
           "checkpoint.every=3", "logging.val_every=3", "logging.sample_every=0", *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log:
        return subprocess.run(cmd, cwd=REPO, env=run_env(**({"PRETRAIN_FAULT": fault} if fault else {})),
                              stdout=log, stderr=subprocess.STDOUT, timeout=TIMEOUT).returncode


@pytest.mark.slow
def test_training_from_a_bucket_through_a_bounded_cache_resumes_exactly(demo_data, s3, tmp_path):
    """The demo data packed into a bucket in small shards; 2-rank ZeRO-3 training streams it through a local
    cache bounded by data.cache_limit (below the data set's size), is killed with kill -9 after step 3 and
    resumed: every step consumes the same sequences (metrics.jsonl's per-step digest) as the same run from the
    same shards on local disk; the relaunch reuses the cache folder."""
    import yaml

    from test_train_e2e import train_rows

    streams = {"train": [], "val": []}
    for sc in demo_data.data_config.streams:
        inputs = ([str(demo_data.root / "raw" / "texts.jsonl")] if sc.name == "text"
                  else [str(demo_data.root / "latents" / sc.name)])
        _pack(demo_data, sc.name, inputs, str(tmp_path / "packs" / sc.name), 1 << 14)  # 8 KiB left an empty pairs shard
        _pack(demo_data, sc.name, inputs, s3.url("packs", sc.name), 1 << 14)
        for split in streams:
            streams[split].append((sc.name, str(tmp_path / "packs" / sc.name / split), s3.url("packs", sc.name, split)))
    index = [json.loads((Path(local) / "index.json").read_text()) for _, local, _ in streams["train"]]
    shard_bytes = [sh["raw_data"]["bytes"] for ix in index for sh in ix["shards"]]
    limit = 4 * max(shard_bytes) + 8192
    assert limit < sum(shard_bytes) / 2, (limit, sum(shard_bytes))  # the cache holds well under the data set

    def data_yaml(name: str, remote: bool) -> Path:
        key = "remote" if remote else "local"
        d = {split: [{"name": n, key: r if remote else loc} for n, loc, r in ss] for split, ss in streams.items()}
        data = {"streams": d["train"], "val_streams": d["val"], "cache_limit": str(limit) + "b" if remote else None}
        (tmp_path / name).write_text(yaml.safe_dump({"data": data}))
        return tmp_path / name

    local_run, s3_run = tmp_path / "local", tmp_path / "s3"
    assert _train(demo_data, local_run, data_yaml("local.yaml",
                                                  False)) == 0, (local_run / "train.log").read_text()[-3000:]
    cfg = data_yaml("s3.yaml", True)
    assert _train(demo_data, s3_run, cfg, fault="kill_after_step=3") != 0
    assert (s3_run / "checkpoints/step_00000003/COMPLETE").is_file(), (s3_run / "train.log").read_text()[-3000:]
    caches = sorted(p.name for p in (s3_run / "cache").iterdir() if p.is_dir())
    assert _train(demo_data, s3_run, cfg) == 0, (s3_run / "train.log").read_text()[-3000:]
    assert "resumed from" in (s3_run / "train.log").read_text()
    assert sorted(p.name for p in (s3_run / "cache").iterdir() if p.is_dir()) == caches  # the relaunch reused them
    ref, got = train_rows(local_run), train_rows(s3_run)
    print("\nlocal digests:", [ref[s]["digest"] for s in sorted(ref)])
    print("s3 digests:   ", [got[s]["digest"] for s in sorted(got)])
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert [got[s]["digest"] for s in range(1, 7)] == [ref[s]["digest"] for s in range(1, 7)]
    cached = sum(p.stat().st_size for p in (s3_run / "cache").rglob("*.mds"))
    assert cached <= 2 * limit, (cached, limit)  # train and val: each dataset within its limit
