"""Pack parallel across ranks (issue 28.3): parts by rank, byte-identical output for 1 and 2 processes, resume by
part after a kill -9, and pack written straight into an S3 bucket (moto server).

The references are independent runs of the same command: one process (rank 0 of 1) against two processes
(RANK=0/1, WORLD_SIZE=2), compared file by file on their bytes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import pack

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a red blue green circle square triangle top bottom left right and of with in on image text".split()


def _corpus(path: Path, docs: int = 1500, seed: int = 0) -> Path:
    """A jsonl text corpus of `docs` documents of 5..300 words (a few bad lines among them)."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 300)))}) for _ in range(docs)]
    lines[7], lines[500] = '{"text": "unterminated', json.dumps({"body": "no text field"})
    path.write_text("\n".join(lines) + "\n")
    return path


def _text_argv(corpus: Path, tokenizer: Path, out: Path) -> list[str]:
    return ["--kind", "text", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out),
            "--seq-len", "256", "--val-every", "10", "--part-bytes", "20000", "--shard-size", "65536"]


def _pairs_argv(demo, out: Path) -> list[str]:
    return ["--kind", "pairs", "--input", str(demo.root / "latents" / "pairs"), "--tokenizer", str(demo.tokenizer),
            "--out", str(out), "--seq-len", "256", "--patch-size", str(demo.patch_size), "--val-every", "10",
            "--part-docs", "40"]


def _run(argv: list[str], rank: int = 0, world: int = 1) -> dict | None:
    return pack.run(pack.PackOptions(**vars(pack.build_parser().parse_args(argv))), rank_and_world=(rank, world))


def _files(root: Path) -> dict[str, bytes]:
    """Every file under `root` by relative path; JSON reports without their timings (`seconds`)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "pack.json" and p.parent == root or p.parent.name == "parts":
                d = json.loads(data)
                d.pop("seconds", None)
                data = json.dumps(d, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    return {**env, **extra}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("corpus") / "texts.jsonl")


@pytest.fixture(scope="module")
def one_rank(demo_data, corpus, tmp_path_factory) -> Path:
    """The text corpus and the demo pairs packed by one process (the reference)."""
    root = tmp_path_factory.mktemp("one_rank")
    _run(_text_argv(corpus, demo_data.tokenizer, root / "text"))
    _run(_pairs_argv(demo_data, root / "pairs"))
    return root


@pytest.mark.slow
def test_two_processes_write_the_same_bytes_as_one(demo_data, corpus, one_rank, tmp_path) -> None:
    """Text (with bad lines) and pairs packed by RANK=0/1 of WORLD_SIZE=2 equal one process's output, byte for byte."""
    script = ("import sys; from data_pipeline import pack; "
              "pack.main(sys.argv[1:sys.argv.index('--')]); pack.main(sys.argv[sys.argv.index('--') + 1:])")
    argv = [*_text_argv(corpus, demo_data.tokenizer, tmp_path / "text"), "--",
            *_pairs_argv(demo_data, tmp_path / "pairs")]
    procs = [subprocess.Popen([sys.executable, "-c", script, *argv], cwd=ROOT, env=_env(RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "[pack rank 1/2]" in logs[1] and "mine, 0 already done" in logs[1]  # really a second rank with work
    for kind in ("text", "pairs"):
        ref, two = _files(one_rank / kind), _files(tmp_path / kind)
        assert sorted(ref) == sorted(two), kind
        assert len([f for f in ref if f.startswith("parts/")]) >= 5, kind  # several parts, spread over both ranks
        for f in ref:
            assert ref[f] == two[f], f"{kind}/{f} differs between 1 and 2 processes"
    rep = json.loads((tmp_path / "text" / "pack.json").read_text())
    assert rep["skipped_documents"] == {"bad_json": 1, "no_text": 1}  # counted once, whichever rank read them
    assert [n["reason"] for n in rep["named"]] == ["bad_json", "no_text"]


@pytest.mark.slow
def test_killed_run_resumes_by_part_to_the_same_bytes(demo_data, corpus, one_rank, tmp_path, capsys) -> None:
    """kill -9 a one-rank pack after its first finished part; the rerun keeps the finished parts, packs the rest and
    ends with the bytes of an uninterrupted run."""
    out = tmp_path / "text"
    argv = _text_argv(corpus, demo_data.tokenizer, out)
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.pack", *argv], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list((out / "parts").glob("part-*.json")) and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "parts").glob("part-*.json")))
    n_parts = len(list((one_rank / "text" / "parts").glob("part-*.json")))
    assert 1 <= done < n_parts and not (out / "pack.json").exists(), f"killed after {done} of {n_parts} parts"
    capsys.readouterr()
    _run(argv)
    printed = capsys.readouterr().out
    assert "unfinished run" in printed
    kept = int(printed.split(" already done")[0].rsplit(" ", 1)[1])
    assert kept >= done, printed
    ref, resumed = _files(one_rank / "text"), _files(out)
    assert sorted(ref) == sorted(resumed)
    for f in ref:
        assert ref[f] == resumed[f], f"{f} differs after resuming"


@pytest.mark.slow
def test_pack_into_an_s3_bucket(demo_data, corpus, s3, tmp_path) -> None:
    """--out s3://bucket/prefix: every object equals the local pack's file; a rerun finds the finished pack there."""
    url = s3.url("shards", "text")
    argv = _text_argv(corpus, demo_data.tokenizer, tmp_path / "local")
    argv[argv.index("--part-bytes") + 1] = "300000"  # 4 parts: each remote part costs a few requests
    _run(argv)
    argv[argv.index("--out") + 1] = url
    t0 = time.time()
    rep = _run(argv)
    print(f"packed into s3 in {time.time() - t0:.1f}s")
    assert rep is not None and rep["parts"] >= 3
    client = s3.client()
    keys = sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
                      Bucket=s3.bucket, Prefix="shards/text/")
                  for o in page.get("Contents", []))
    ref = _files(tmp_path / "local")
    assert [k.removeprefix("shards/text/") for k in keys] == sorted(ref)
    for k in keys:
        rel = k.removeprefix("shards/text/")
        body = client.get_object(Bucket=s3.bucket, Key=k)["Body"].read()
        if rel == "pack.json" or rel.startswith("parts/"):
            d = json.loads(body)
            d.pop("seconds", None)
            body = json.dumps(d, sort_keys=True).encode()
        assert body == ref[rel], f"{k} differs from the local pack"
    assert _run(argv) == rep  # the finished remote pack is found and reused
