"""Inputs as large corpora come (issue 28.4): parquet pairs (LAION / Hugging Face image columns), OBELICS-style
interleaved parquet, brace-range input lists, and tar/parquet read from an S3 bucket (moto server).

Parquet files are written with pyarrow, as the corpora's tools write them; bad rows must be skipped, counted
by reason and named, as for jsonl and tars.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import sources
from data_pipeline.pack import read_mds
from data_pipeline.synthetic import draw_shape


def _png(colour: str = "red", shape: str = "circle") -> bytes:
    buf = io.BytesIO()
    draw_shape(colour, shape, "top").save(buf, format="PNG")
    return buf.getvalue()


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # what `datasets` writes for an Image column


def _pairs_parquet(path: Path, row_group_size: int = 3) -> list[str]:
    """Nine LAION/HF-style rows (image struct + caption), three of them bad; returns the expected captions of the
    good."""
    (path.parent / "side.png").write_bytes(_png("blue", "square"))
    images = [{"bytes": _png(), "path": None},                       # 0 HF struct with bytes
              {"bytes": None, "path": "side.png"},                   # 1 HF struct, path relative to the parquet file
              None,                                                   # 2 null image -> no_image
              {"bytes": _png("green", "triangle"), "path": "x.png"},  # 3 bytes win over path
              {"bytes": b"not an image", "path": None},               # 4 undecodable: precompute counts it by reason
              {"bytes": _png(), "path": None},                        # 5 null caption -> no_caption
              {"bytes": _png(), "path": None},                        # 6 empty caption -> empty_caption
              {"bytes": None, "path": "missing.png"},                 # 7 unreadable path -> missing_file image
              {"bytes": _png("yellow"), "path": None}]                # 8
    captions = ["a red circle", "a blue square", "nothing", "a green triangle", "broken", None, "  ", "gone",
                "a yellow circle"]
    table = pa.table({"image": pa.array(images, HF_IMAGE), "caption": pa.array(captions, pa.string()),
                      "url": pa.array([f"http://x/{i}" for i in range(9)])})
    pq.write_table(table, path, row_group_size=row_group_size)
    return ["a red circle", "a blue square", "a green triangle", "broken", "gone", "a yellow circle"]


def _records(inputs: list[str], kind: str = "pairs", part_size: int = 1000, **cols: str) -> list[sources.Record]:
    return [r for p in sources.list_parts(inputs, part_size)
            for r in sources.read_part(p, kind, columns=sources.Columns(**cols))]


def test_parquet_pairs_hf_struct_and_bad_rows(tmp_path: Path) -> None:
    """HF `{"bytes", "path"}` structs (bytes or a relative path) become pairs; null/empty cells are skipped by reason
    and named by file and row; parts are row ranges that cross row groups and give the same records."""
    f = tmp_path / "laion.parquet"
    good = _pairs_parquet(f)
    recs = _records([str(f)])
    assert [r.segments[0][1] for r in recs if not r.skipped] == good
    assert [(Path(r.key).name, r.skipped) for r in recs if r.skipped] == [
        ("laion.parquet:row 2", "no_image"), ("laion.parquet:row 5", "no_caption"),
        ("laion.parquet:row 6", "empty_caption")]
    by_cap = {r.segments[0][1]: r.segments[1][1] for r in recs if not r.skipped}
    assert by_cap["a blue square"] == (tmp_path / "side.png").read_bytes()  # read from the path beside the file
    assert by_cap["gone"] is None  # an unreadable path is a missing image (precompute counts missing_file)
    parts = sources.list_parts([str(f)], part_size=4)  # 0-4, 4-8, 8-9 across row groups of 3
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 9)]
    assert [(r.key, r.skipped, r.segments) for r in _records([str(f)], part_size=4)] == \
        [(r.key, r.skipped, r.segments) for r in recs]
    assert len({sources.part_fingerprint(p) for p in parts}) == 3


def test_parquet_columns_are_configurable_and_a_missing_one_is_named(tmp_path: Path) -> None:
    """LAION parquet names its columns `jpg` / `TEXT`: --image-column / --caption-column pick them; a wrong name is
    an error naming the file, the column and the flag."""
    f = tmp_path / "l.parquet"
    pq.write_table(pa.table({"jpg": [_png()], "TEXT": ["a red circle"]}), f)
    recs = _records([str(f)], image="jpg", caption="TEXT")
    assert recs[0].segments == [("text", "a red circle"), ("image", _png())]
    with pytest.raises(ValueError, match=r"l.parquet: no column 'image' .*--image-column"):
        _records([str(f)])


def test_obelics_interleaved_parquet(tmp_path: Path) -> None:
    """OBELICS rows: parallel `texts` / `images` lists with nulls, images as bytes or paths; malformed rows skipped by
    reason."""
    f = tmp_path / "obelics.parquet"
    texts = [["Intro", None, "after the image", None],  # 0 text, image, text, image
             [None, "only text"],                       # 1 position 0 is null in both lists: dropped
             ["a", "b"],                                # 2 lists of different lengths -> bad_row
             ["both", None],                            # 3 a text and an image at one position -> bad_segment
             None]                                      # 4 null lists -> bad_row
    images = [[None, _png(), None, _png("blue")], [None, None], [None], [_png(), None], None]
    pq.write_table(pa.table({"texts": pa.array(texts, pa.list_(pa.string())),
                             "images": pa.array(images, pa.list_(pa.binary()))}), f)
    recs = _records([str(f)], kind="interleaved")
    assert [(Path(r.key).name, r.skipped) for r in recs if r.skipped] == [
        ("obelics.parquet:row 2", "bad_row"), ("obelics.parquet:row 3", "bad_segment"),
        ("obelics.parquet:row 4", "bad_row")]
    assert recs[1].segments == [("text", "only text")]
    assert [k for k, _ in recs[0].segments] == ["text", "image", "text", "image"]
    assert recs[0].segments[1][1] == _png() and recs[0].segments[3][1] == _png("blue")
    # paths: a string list column, relative to the parquet file, and a missing one counted as a missing image
    (tmp_path / "local.png").write_bytes(_png("blue"))
    g = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"texts": [["see", None, None]], "images": [[None, "local.png", "nope.png"]]}), g)
    (rec,) = _records([str(g)], kind="interleaved")
    assert rec.segments == [("text", "see"), ("image", _png("blue")), ("image", None)]


def test_brace_ranges_expand_in_order_and_name_a_missing_member(tmp_path: Path) -> None:
    assert sources.expand_braces("s3://b/laion/{00098..00101}.tar") == [
        "s3://b/laion/00098.tar", "s3://b/laion/00099.tar", "s3://b/laion/00100.tar", "s3://b/laion/00101.tar"]
    assert sources.expand_braces("d{1..2}/x.{tar,parquet}") == ["d1/x.tar", "d1/x.parquet", "d2/x.tar", "d2/x.parquet"]
    for i in range(3):
        pq.write_table(pa.table({"image": [_png()], "caption": [f"c{i}"]}), tmp_path / f"{i:05d}.parquet")
    pattern = str(tmp_path / "{00000..00002}.parquet")
    assert [r.segments[0][1] for r in _records([pattern])] == ["c0", "c1", "c2"]
    with pytest.raises(FileNotFoundError, match=r"00003.parquet: no such input file .*from .*\{00000..00003\}"):
        sources.expand([str(tmp_path / "{00000..00003}.parquet")])


def _tar(path: Path, n: int) -> None:
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            for name, data in ((f"{i:04d}.png", _png()), (f"{i:04d}.txt", f"caption {path.stem} {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_remote_tar_and_parquet_brace_ranges_read_streamed_from_s3(s3, tmp_path: Path) -> None:
    """tar and parquet shards in a bucket (moto server), listed by a brace range, give the same records as local copies;
    a missing shard is an error naming its URL."""
    client = s3.client()
    for i in range(2):
        _tar(tmp_path / f"{i:05d}.tar", 3)
        client.upload_file(str(tmp_path / f"{i:05d}.tar"), s3.bucket, f"web/{i:05d}.tar")
    good = _pairs_parquet(tmp_path / "laion.parquet")
    client.upload_file(str(tmp_path / "laion.parquet"), s3.bucket, "pq/laion.parquet")
    client.upload_file(str(tmp_path / "side.png"), s3.bucket, "pq/side.png")  # the struct's relative path, remote too
    remote = _records([s3.url("web/{00000..00001}.tar")])
    local = _records([str(tmp_path / "{00000..00001}.tar")])
    assert [r.segments for r in remote] == [r.segments for r in local] and len(remote) == 6
    assert remote[0].key == s3.url("web/00000.tar") + ":0000"
    recs = _records([s3.url("pq/laion.parquet")])
    assert [r.segments[0][1] for r in recs if not r.skipped] == good
    assert [r.segments for r in recs] == [r.segments for r in _records([str(tmp_path / "laion.parquet")])]
    with pytest.raises(Exception, match=r"s3://.*web/00002.tar"):
        _records([s3.url("web/{00000..00002}.tar")])


def test_precompute_and_pack_parquet_pairs_count_and_name_skips(demo_data, tmp_path: Path) -> None:
    """precompute reads parquet pairs (skips counted by reason and named in report.json) and pack packs them."""
    from data_pipeline import pack, precompute

    f = tmp_path / "laion.parquet"
    good = _pairs_parquet(f)
    out = tmp_path / "latents"
    argv = ["--input", str(f), "--vae", str(demo_data.vae), "--out", str(out), "--image-size", "64",
            "--decode-threads", "1", "--part-size", "4"]
    rep = precompute.run(precompute.PrecomputeOptions(**vars(precompute.build_parser().parse_args(argv))), (0, 1))
    # the broken and the missing images drop their pairs
    assert rep["records_read"] == 9 and rep["records_written"] == 4
    assert rep["records_skipped"] == {"empty_caption": 1, "no_caption": 1, "no_image": 1}
    assert sum(rep["skipped"].values()) == 2 and rep["skipped"]["missing_file"] == 1
    named = {(n["record"].rsplit("/", 1)[1], n["reason"]) for n in rep["named"]}
    assert ("laion.parquet:row 2", "no_image") in named and ("laion.parquet:row 7", "missing_file") in named
    assert [s["doc"][0]["text"] for s in read_mds(out)] == [c for c in good if c not in ("broken", "gone")]
    prep = pack.run(pack.PackOptions("pairs", [str(out)], str(demo_data.tokenizer), str(tmp_path / "shards"),
                                     seq_len=256,
                                     patch_size=demo_data.patch_size), (0, 1))
    assert prep["train"]["images"] == 4
    assert json.loads((tmp_path / "shards" / "train" / "pack.json").read_text())["images"] == 4
