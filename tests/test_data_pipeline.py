"""End-to-end data pipeline on the fast demo data: raw docs -> shards -> loader -> TransfusionBatch.

Real sentencepiece, a real (random-init) diffusers VAE, real MDS shards read by real streaming.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contract.batch import IGNORE_INDEX
from data_pipeline import sources, vae as vaelib
from data_pipeline.config import StreamConfig
from data_pipeline.loader import build_loader, mix_proportions
from data_pipeline.pack import read_mds
from data_pipeline.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _cfg(demo, names=None, **kw):
    dc = demo.data_config
    streams = [s for s in dc.streams if names is None or s.name in names]
    kw.setdefault("num_workers", 0)
    return dataclasses.replace(dc, streams=streams, **kw)


def _loader(demo, cfg, split="train", mbs=1, seed=0):
    return build_loader(cfg, split, micro_batch_size=mbs, seed=seed, patch_size=demo.patch_size,
                        latent_shape=demo.latent_shape, diffusion_steps=1000)


def _one_epoch(demo, cfg, mbs=1):
    ld = _loader(demo, cfg, mbs=mbs)
    n = ld.dataset.epoch_size // mbs
    out = []
    for i, b in enumerate(ld):
        if i == n:
            break
        b.validate(demo.patch_size)
        out.append(b)
    return out


def test_text_roundtrip_bit_exact(demo_data):
    """Every train text document comes back as exactly BOS + its tokens + EOS, none lost or repeated."""
    tok = Tokenizer(demo_data.tokenizer)
    ids = tok.ids
    texts = list(sources.iter_texts([str(demo_data.root / "raw" / "texts.jsonl")]))
    expected = Counter(tuple(tok.encode(t)) for i, t in enumerate(texts) if i % 10 != 9)  # val_every=10
    batches = _one_epoch(demo_data, _cfg(demo_data, ["text"], shuffle=False, image_position_share=None))
    stream = torch.cat([b.tokens[0][b.tokens[0] != ids.pad_id] for b in batches]).tolist()
    got, cur = Counter(), None
    for t in stream:
        if t == ids.bos_id:
            cur = []
        elif t == ids.eos_id:
            got[tuple(cur)] += 1
            cur = None
        else:
            cur.append(t)
    assert got == expected
    b = batches[0]
    real = b.tokens[0] != ids.pad_id
    nxt_same_doc = torch.cat([b.doc_ids[0][1:] == b.doc_ids[0][:-1], torch.tensor([False])])
    want = torch.where(real & nxt_same_doc, torch.roll(b.tokens[0], -1), IGNORE_INDEX)
    assert torch.equal(b.targets[0], want)


def _pairs_from_batch(b, ids, P):
    """(caption tokens, latent bytes) of every image in a batch of caption-image pairs."""
    out = []
    for r in range(b.tokens.shape[0]):
        toks, img = b.tokens[r].tolist(), b.image_ids[r].tolist()
        for s in [i for i in range(len(toks)) if toks[i] == ids.boi_id]:
            k = img[s + 1]
            if toks[s - 1] == ids.bos_id:  # image first: caption after EOI
                e = toks.index(ids.eos_id, s + P + 2)
                cap = toks[s + P + 2 : e]
            else:  # caption first: caption between BOS and BOI
                bos = max(i for i in range(s) if toks[i] == ids.bos_id)
                cap = toks[bos + 1 : s]
            out.append((tuple(cap), b.latents[k].numpy().astype(np.float16).tobytes()))
    return out


def test_pairs_roundtrip_bit_exact(demo_data):
    """Each pair's caption tokens and its precomputed latent reach the batch unchanged, fp16 bit for bit."""
    tok = Tokenizer(demo_data.tokenizer)
    P = 16
    want = Counter()
    for i, s in enumerate(read_mds(demo_data.root / "latents" / "pairs")):
        if i % 10 != 9:
            want[(tuple(tok.encode(s["doc"][0]["text"])), s["latents"][0].tobytes())] += 1
    cfg = _cfg(demo_data, ["pairs"], shuffle=False, caption_dropout=0.0, image_position_share=None)
    # micro-batches of 1: one epoch is every row (of 2, an odd row count leaves the last row to the next epoch)
    got = Counter(p for b in _one_epoch(demo_data, cfg, mbs=1) for p in _pairs_from_batch(b, tok.ids, P))
    assert got == want


def test_precomputed_latents_match_direct_encode(demo_data):
    """The stored fp16 latent equals a direct VAE encode of the decoded image, to fp16 precision."""
    vae = vaelib.load_vae(demo_data.vae)
    recs = list(sources.read_part(sources.list_parts([str(demo_data.root / "raw" / "pairs.jsonl")])[0], "pairs"))[:8]
    from data_pipeline.images import load_image
    x = torch.from_numpy(np.stack([load_image(r.segments[1][1], 64) for r in recs]))
    direct = vaelib.encode(vae, x)  # (8, C, h, w)
    shards = read_mds(demo_data.root / "latents" / "pairs")
    stored = torch.stack([torch.from_numpy(s["latents"][0].astype(np.float32)) for _, s in zip(range(8), shards)])
    torch.testing.assert_close(stored, direct, atol=2e-3, rtol=2e-3)
    stats = json.loads((demo_data.vae / "latent_stats.json").read_text())
    assert stats["std"] > 0


def test_pair_randomness_layout_and_caps(demo_data):
    """Caption-first ~80%, image-first pairs have t <= 500, dropout ~10%; same (seed, epoch, id) -> same batch."""
    cfg = _cfg(demo_data, ["pairs"], shuffle=False, image_position_share=None)
    ids = Tokenizer(demo_data.tokenizer).ids
    first, img_first_t, dropped = [], [], 0
    batches = _one_epoch(demo_data, cfg, mbs=2)
    for b in batches:
        toks = b.tokens
        for r in range(toks.shape[0]):
            t = toks[r].tolist()
            for s in [i for i in range(len(t)) if t[i] == ids.boi_id]:
                k = b.image_ids[r][s + 1].item()
                if t[s - 1] == ids.bos_id and t[s + 18] != ids.eos_id:
                    img_first_t.append(b.timesteps[k].item())
                    first.append(False)
                else:
                    first.append(True)
                    dropped += t[s - 1] == ids.bos_id
    assert img_first_t and max(img_first_t) <= 500
    assert 0.65 < np.mean(first) < 0.92, np.mean(first)
    assert 0 < dropped < 0.25 * sum(first)
    again = _one_epoch(demo_data, cfg, mbs=2)
    for a, b in zip(batches, again):
        assert torch.equal(a.noise, b.noise) and torch.equal(a.timesteps, b.timesteps)
        assert torch.equal(a.tokens, b.tokens)
    other = _loader(demo_data, cfg, mbs=2, seed=1)
    assert not torch.equal(next(iter(other)).noise, batches[0].noise)


def _packed_streams(root: Path, seq_len: int, specs: tuple) -> list[StreamConfig]:
    """Streams whose pack.json says (name, rows, share of image positions), for mix_proportions."""
    streams = []
    for name, rows, share in specs:
        (root / name).mkdir()
        (root / name / "pack.json").write_text(json.dumps(
            {"rows": rows, "positions": rows * seq_len, "image_positions": int(share * rows * seq_len)}))
        streams.append(StreamConfig(name=name, local=str(root / name)))
    return streams


def test_mix_proportions_reach_one_to_one(tmp_path):
    """With paper-like streams (text 0%, pairs 91% image positions) the derived mix gives 50% image positions."""
    streams = _packed_streams(tmp_path, 4096, (("text", 1000, 0.0), ("pairs", 300, 0.91), ("inter", 100, 0.3)))
    w = mix_proportions(streams, 0.5)
    assert abs(sum(w) - 1) < 1e-9
    assert abs(w[0] * 0.0 + w[1] * 0.91 + w[2] * 0.3 - 0.5) < 1e-6
    assert abs(w[0] / w[2] - 10.0) < 1e-6  # within the text-heavy group: by size


def test_unreachable_image_share_is_an_error_not_a_silent_mix_by_size(tmp_path):
    """The demo's streams (pairs 49% image positions, captions the rest): asking for 0.5 used to fall
    back to mixing by size, 13% image positions; now it names each stream's share. 0.45 is reached."""
    streams = _packed_streams(tmp_path, 256, (("text", 682, 0.0), ("pairs", 229, 0.49), ("interleaved", 175, 0.146)))
    with pytest.raises(ValueError, match=r"image_position_share=0.5 cannot be reached.*pairs 0.490.*proportion"):
        mix_proportions(streams, 0.5)
    with pytest.raises(ValueError, match="cannot be reached"):
        mix_proportions(streams[1:], 0.1)  # every stream above it
    w = mix_proportions(streams, 0.45)
    assert abs(w[0] * 0.0 + w[1] * 0.49 + w[2] * 0.146 - 0.45) < 1e-3 and w[1] > 0.85


def test_default_mix_matches_prediction(demo_data):
    """The measured share of image positions over one epoch matches the mix derived from pack.json, +- 0.03."""
    cfg = _cfg(demo_data)
    w = mix_proportions(cfg.streams, cfg.image_position_share)
    stats = [json.loads((Path(s.local) / "pack.json").read_text()) for s in cfg.streams]
    predicted = sum(wi * st["image_positions"] / st["positions"] for wi, st in zip(w, stats))
    img = pos = 0
    for b in _one_epoch(demo_data, cfg, mbs=4):
        img += int((b.image_ids >= 0).sum())
        pos += b.tokens.numel()
    assert abs(img / pos - predicted) < 0.03, (img / pos, predicted)


def test_explicit_proportions_hold(demo_data):
    """Stream proportions 0.25 text / 0.75 pairs: share of image-free rows 0.25 +- 0.03 over one epoch."""
    streams = [dataclasses.replace(s, proportion=p)
               for s, p in zip(_cfg(demo_data, ["text", "pairs"]).streams, (0.25, 0.75))]
    cfg = dataclasses.replace(demo_data.data_config, streams=streams, num_workers=0)
    rows = no_img = 0
    for b in _one_epoch(demo_data, cfg, mbs=2):
        for r in range(b.tokens.shape[0]):
            rows += 1
            no_img += int((b.image_ids[r] >= 0).sum()) == 0
    assert rows > 100 and abs(no_img / rows - 0.25) < 0.03, no_img / rows


def test_remote_directory_with_local_cache(demo_data, tmp_path):
    """A local directory used as the remote is downloaded into the job cache and yields the same batches."""
    local = _cfg(demo_data, ["pairs"], shuffle=False, image_position_share=None)
    remote = dataclasses.replace(local, cache_dir=str(tmp_path / "cache"),
                                 streams=[StreamConfig(name="pairs", remote=local.streams[0].local)])
    a = _one_epoch(demo_data, local, mbs=2)
    b = _one_epoch(demo_data, remote, mbs=2)
    assert len(a) == len(b) and all(torch.equal(x.tokens, y.tokens) and torch.equal(x.latents, y.latents) for x,
                                    y in zip(a, b))
    assert list((tmp_path / "cache").rglob("*.mds"))


def test_corrupt_shard_error_names_it(demo_data, tmp_path):
    src = Path(demo_data.data_config.streams[0].local)
    shutil.copytree(src, tmp_path / "bad")
    shard = sorted((tmp_path / "bad").rglob("*.mds"))[0]  # pack writes part-K/shard.*.mds
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = dataclasses.replace(demo_data.data_config, streams=[StreamConfig(name="bad", local=str(tmp_path / "bad"))],
                              num_workers=0, shuffle=False)
    with pytest.raises(RuntimeError, match=str(shard)):
        for _ in zip(range(1000), _loader(demo_data, cfg)):
            pass


def test_val_split_is_one_pass_with_fixed_noise(demo_data):
    """Val reads every val row once, unshuffled, and every pass sees the same noise and timesteps."""
    cfg = dataclasses.replace(demo_data.data_config, num_workers=0)
    ld = _loader(demo_data, cfg, split="val", mbs=1)
    first = list(ld)
    for b in first:
        b.validate(demo_data.patch_size)
    rows = sum(json.loads((Path(s.local) / "pack.json").read_text())["rows"] for s in cfg.val_streams)
    assert len(first) == rows
    second = list(ld)
    assert all(torch.equal(a.noise, b.noise) and torch.equal(a.tokens, b.tokens) for a, b in zip(first, second))


def _bad_image_inputs(root: Path) -> Path:
    """A pairs jsonl with one good image of each mode and every kind of bad image."""
    d = root / "imgs"
    d.mkdir(parents=True)
    good = {"rgb.png": Image.new("RGB", (80, 64), (9, 200, 9)),
            "rgba.png": Image.new("RGBA", (64, 64), (9, 9, 200, 128)),
            "grey.png": Image.new("L", (64, 70), 128), "pal.png": Image.new("RGB", (64, 64), (200, 0, 0)).convert("P"),
            "cmyk.jpg": Image.new("CMYK", (64, 64), (0, 100, 100, 0))}
    for name, im in good.items():
        im.save(d / name)
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_bytes(b"not an image")
    full = (d / "rgb.png").read_bytes()
    (d / "trunc.png").write_bytes(full[: len(full) // 3])
    Image.new("RGB", (1, 1)).save(d / "tiny.png")
    Image.new("RGB", (640, 32)).save(d / "wide.png")
    Image.new("1", (9000, 9000)).save(d / "bomb.png")
    names = list(good) + ["empty.png", "text.png", "trunc.png", "tiny.png", "wide.png", "bomb.png", "missing.png"]
    jl = root / "pairs.jsonl"
    jl.write_text("".join(json.dumps({"image": f"imgs/{n}", "caption": f"image {n}"}) + "\n" for n in names))
    return jl


def _precompute(args, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "data_pipeline.precompute", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=check, timeout=300)


def test_precompute_skips_and_counts_bad_images(demo_data, tmp_path):
    jl = _bad_image_inputs(tmp_path)
    out = tmp_path / "lat"
    _precompute(["--input", str(jl), "--vae", str(demo_data.vae), "--out", str(out), "--image-size", "64"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["records_read"] == 12 and rep["encoded"] == 5 and rep["records_written"] == 5
    assert rep["skipped"] == {"bad_aspect_ratio": 1, "decompression_bomb": 1, "empty": 1, "missing_file": 1,
                              "not_an_image": 1, "too_small": 1, "truncated": 1}
    assert [s["latents"].shape for s in read_mds(out)] == [(1, 8, 8, 8)] * 5


@pytest.mark.slow
def test_precompute_two_ranks_equal_one_and_resume(demo_data, tmp_path):
    """2 ranks write the same dataset as 1; a rerun after a crash redoes only the unfinished part."""
    raw = str(demo_data.root / "raw" / "pairs.jsonl")
    common = ["--input", raw, "--vae", str(demo_data.vae), "--image-size", "64", "--part-size", "60", "--batch-size",
              "16"]
    _precompute([*common, "--out", str(tmp_path / "one")])
    env2 = {"WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "data_pipeline.precompute", *common, "--out",
                               str(tmp_path / "two")],
                              cwd=ROOT, env={**os.environ, **env2, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
             for r in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*.mds"))
    assert files == sorted(str(p.relative_to(two)) for p in two.rglob("*.mds")) and len(files) == 4
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    assert json.loads((one / "index.json").read_text()) == json.loads((two / "index.json").read_text())
    # crash simulation: part 2 unfinished (no report.json); the rerun redoes only part 2
    (one / "part-00002" / "report.json").unlink()
    before = {f: (one / f).stat().st_mtime_ns for f in files}
    res = _precompute([*common, "--out", str(one)])
    assert "3 already done" in res.stdout
    after = {f: (one / f).stat().st_mtime_ns for f in files}
    assert [f for f in files if before[f] != after[f]] == [f for f in files if f.startswith("part-00002")]
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def _run_precompute(demo, inputs, out, *extra, kind="pairs"):
    from data_pipeline import precompute
    argv = ["--input", *map(str, inputs), "--kind", kind, "--vae", str(demo.vae), "--out", str(out), "--image-size",
            "64",
            "--decode-threads", "1", *extra]
    return precompute.run(precompute.PrecomputeOptions(**vars(precompute.build_parser().parse_args(argv))),
                          rank_and_world=(0, 1))


def test_webdataset_tar_and_folder_inputs(demo_data, tmp_path):
    """img2dataset-style tars (jpg+txt, png+json) and a folder with caption side files are read as pairs."""
    import io
    import tarfile
    from data_pipeline.synthetic import draw_shape, png_bytes

    def jpg(img):
        b = io.BytesIO()
        img.save(b, format="JPEG")
        return b.getvalue()

    members = {"00000.jpg": jpg(draw_shape("red", "circle", "top")), "00000.txt": b"a red circle at the top",
               "00001.png": png_bytes(draw_shape("blue", "square", "left")),
               "00001.json": b'{"caption": "a blue square at the left"}',
               "00002.jpg": b"\xff\xd8broken", "00002.txt": b"broken"}
    with tarfile.open(tmp_path / "000.tar", "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    folder = tmp_path / "folder"
    folder.mkdir()
    draw_shape("green", "triangle", "center").save(folder / "a.png")
    (folder / "a.txt").write_text("a green triangle in the center\n")
    rep = _run_precompute(demo_data, [tmp_path / "*.tar", folder], tmp_path / "out")
    assert (rep["records_read"], rep["encoded"], rep["skipped"]) == (4, 3, {"not_an_image": 1})
    caps = [s["doc"][0]["text"] for s in read_mds(tmp_path / "out")]
    assert caps == ["a red circle at the top", "a blue square at the left", "a green triangle in the center"]


def test_interleaved_bad_image_drops_only_the_image(demo_data, tmp_path):
    from data_pipeline.synthetic import draw_shape
    draw_shape("red", "circle", "top").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"")
    rec = {"segments": [{"text": "one"}, {"image": "ok.png"}, {"text": "two"}, {"image": "bad.png"},
                        {"text": None, "image": None}]}
    (tmp_path / "inter.jsonl").write_text(json.dumps(rec) + "\n")
    rep = _run_precompute(demo_data, [tmp_path / "inter.jsonl"], tmp_path / "out", kind="interleaved")
    assert (rep["records_written"], rep["encoded"], rep["skipped"]) == (1, 1, {"empty": 1})
    (s,) = list(read_mds(tmp_path / "out"))
    assert s["doc"] == [{"text": "one"}, {"image": 0}, {"text": "two"}] and s["latents"].shape == (1, 8, 8, 8)


def test_bad_jsonl_records_skipped_counted_and_named(demo_data, tmp_path):
    """Issue 10: one malformed line among 20 used to stop precompute; now every bad record is skipped and named."""
    from data_pipeline.synthetic import draw_shape
    draw_shape("red", "circle", "top").save(tmp_path / "ok.png")
    good = [json.dumps({"image": "ok.png", "caption": f"a red circle number {i}"}) for i in range(15)]
    bad = ['{"image": "ok.png", "caption": "cut off', json.dumps({"image": "ok.png", "caption": None}),
           json.dumps({"image": "ok.png", "caption": "   "}), json.dumps({"caption": "no image field"}),
           ]
    lines = [ln.encode() for ln in good[:7] + bad + good[7:]] + [b'{"image": "ok.png", "caption": "caf\xe9"}']
    assert len(lines) == 20
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rep = _run_precompute(demo_data, [tmp_path / "p.jsonl"], tmp_path / "out")
    assert (rep["records_read"], rep["records_written"], rep["encoded"]) == (20, 15, 15)
    assert rep["records_skipped"] == {"bad_json": 1, "empty_caption": 1, "no_caption": 1, "no_image_field": 1,
                                      "not_utf8": 1}
    named = {(n["record"].rsplit("/", 1)[1], n["reason"]) for n in rep["named"]}
    assert named == {("p.jsonl:8", "bad_json"), ("p.jsonl:9", "no_caption"), ("p.jsonl:10", "empty_caption"),
                     ("p.jsonl:11", "no_image_field"), ("p.jsonl:20", "not_utf8")}
    assert [s["doc"][0]["text"] for s in read_mds(tmp_path / "out")] == [f"a red circle number {i}" for i in range(15)]
    with pytest.raises(ValueError, match=r"p.jsonl:8: bad_json .*--strict"):
        _run_precompute(demo_data, [tmp_path / "p.jsonl"], tmp_path / "strict", "--strict")


def _tar(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_webdataset_caption_faults_counted_and_latin1_repaired(demo_data, tmp_path):
    """Issue 10: a null caption aborted the run, an image without caption vanished uncounted, Latin-1 got U+FFFD."""
    from data_pipeline.synthetic import draw_shape, png_bytes
    img = png_bytes(draw_shape("red", "circle", "top"))
    _tar(tmp_path / "000.tar", {"a.png": img, "a.txt": b"a red circle",
                                "b.png": img, "b.json": b'{"caption": null}',
                                "c.png": img,  # no caption file at all
                                "d.png": img, "d.txt": "un caf\u00e9 cr\u00e8me".encode("latin-1"),
                                "e.txt": b"a caption without its image"})
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.png").write_bytes(img)  # no side caption
    rep = _run_precompute(demo_data, [tmp_path / "000.tar", folder], tmp_path / "out")
    assert (rep["records_read"], rep["records_written"]) == (6, 1)
    assert rep["records_skipped"] == {"caption_not_utf8": 1, "no_caption": 3, "no_image": 1}
    named = sorted((Path(n["record"]).name, n["reason"]) for n in rep["named"])
    assert named == [("000.tar:b", "no_caption"), ("000.tar:c", "no_caption"), ("000.tar:d", "caption_not_utf8"),
                     ("000.tar:e", "no_image"), ("x.png", "no_caption")]
    rep = _run_precompute(demo_data, [tmp_path / "000.tar"], tmp_path / "fixed", "--caption-fallback-encoding",
                          "cp1252")
    assert rep["repaired"] == {"caption_cp1252": 1} and rep["records_written"] == 2
    assert [s["doc"][0]["text"] for s in read_mds(tmp_path / "fixed")] == ["a red circle", "un caf\u00e9 cr\u00e8me"]


def test_mismatched_shapes_are_clear_errors(demo_data):
    with pytest.raises(ValueError, match="seq_len=256 but data.seq_len=512"):
        _loader(demo_data, _cfg(demo_data, seq_len=512))
    with pytest.raises(ValueError, match="repack with matching --patch-size"):
        build_loader(_cfg(demo_data, ["pairs"]), "train", 1, 0, 4, demo_data.latent_shape, 1000)


def _run_pack(argv: list[str]) -> dict:
    from data_pipeline import pack
    return pack.run(pack.PackOptions(**vars(pack.build_parser().parse_args(argv))))


def test_pack_text_skips_and_names_bad_lines(demo_data, tmp_path):
    """A malformed text line is skipped and named in pack.json; --strict stops at it."""
    lines = [json.dumps({"text": f"document {i}\n\twith  its layout"}).encode() for i in range(6)]
    lines[2], lines[4] = b'{"text": "unterminated', json.dumps({"txt": "wrong field"}).encode()
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    argv = ["--kind", "text", "--input", str(tmp_path / "t.jsonl"), "--tokenizer", str(demo_data.tokenizer),
            "--seq-len", "64", "--val-every", "2"]
    rep = _run_pack([*argv, "--out", str(tmp_path / "out")])
    assert rep["skipped_documents"] == {"bad_json": 1, "no_text": 1}
    offset = [sum(len(line) + 1 for line in lines[:i]) for i in range(len(lines))]  # records are named FILE@BYTE
    assert [(Path(n["record"]).name, n["reason"]) for n in rep["named"]] == [(f"t.jsonl@{offset[2]}", "bad_json"),
                                                                             (f"t.jsonl@{offset[4]}", "no_text")]
    tok = Tokenizer(demo_data.tokenizer)
    rows = [r["tokens"][: r["n_real"]].tolist() for split in ("train",
                                                              "val") for r in read_mds(tmp_path / "out" / split)]
    texts = sorted(tok.decode(t) for row in rows for t in _split_docs(row, tok.ids))
    assert texts == [f"document {i}\n\twith  its layout" for i in (0, 1, 3, 5)]
    with pytest.raises(ValueError, match=rf"t.jsonl@{offset[2]}: not valid JSON"):
        _run_pack([*argv, "--out", str(tmp_path / "strict"), "--strict"])


def _split_docs(row: list[int], ids) -> list[list[int]]:
    """Token lists between BOS and EOS in a packed text row."""
    out, cur = [], None
    for t in row:
        if t == ids.bos_id:
            cur = []
        elif t == ids.eos_id and cur is not None:
            out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(t)
    return out


def test_precompute_resume_checks_part_identity(demo_data, tmp_path, capsys):
    """Issue 10: adding a.jsonl before b.jsonl, or changing --part-size, made a rerun keep b's parts as 'done'."""
    from data_pipeline.synthetic import draw_shape
    inp = tmp_path / "inputs"
    inp.mkdir()
    draw_shape("red", "circle", "top").save(inp / "x.png")

    def write(name, n):
        (inp / name).write_text("".join(json.dumps({"image": "x.png",
                                                    "caption": f"{name} {i}"}) + "\n" for i in range(n)))

    def caps(out):
        return [s["doc"][0]["text"] for s in read_mds(out)]

    write("b.jsonl", 3)
    out = tmp_path / "out"
    _run_precompute(demo_data, [inp / "*.jsonl"], out, "--part-size", "2")
    assert caps(out) == ["b.jsonl 0", "b.jsonl 1", "b.jsonl 2"]
    capsys.readouterr()
    _run_precompute(demo_data, [inp / "*.jsonl"], out, "--part-size", "2")  # same work: all reused
    assert "2 already done" in capsys.readouterr().out
    write("a.jsonl", 2)  # sorts first: part 0 is now a.jsonl:0-2
    rep = _run_precompute(demo_data, [inp / "*.jsonl"], out, "--part-size", "2")
    printed = capsys.readouterr().out
    assert "0 already done" in printed and "differs in ['input_sha256', 'part']" in printed
    assert caps(out) == ["a.jsonl 0", "a.jsonl 1", "b.jsonl 0", "b.jsonl 1",
                         "b.jsonl 2"] and rep["records_written"] == 5
    with (inp / "b.jsonl").open("a") as f:  # appended lines: b's first part keeps its identity
        f.write(json.dumps({"image": "x.png", "caption": "b.jsonl 3"}) + "\n")
    _run_precompute(demo_data, [inp / "*.jsonl"], out, "--part-size", "2")
    assert "2 already done" in capsys.readouterr().out
    # a.jsonl:0-2 unchanged, b's parts redone
    rep = _run_precompute(demo_data, [inp / "*.jsonl"], out, "--part-size", "3")
    assert "1 already done" in capsys.readouterr().out
    assert caps(out) == ["a.jsonl 0", "a.jsonl 1", "b.jsonl 0", "b.jsonl 1", "b.jsonl 2", "b.jsonl 3"]
    assert rep["parts"] == 3 and rep["records_written"] == 6


def test_pack_rerun_checks_identity(demo_data, tmp_path, capsys):
    """A finished pack is reused only for the same inputs and options; otherwise a clear stop; a crashed one is
    redone."""
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    argv = ["--kind", "text", "--input", str(src), "--tokenizer", str(demo_data.tokenizer), "--out",
            str(tmp_path / "out")]
    first = _run_pack([*argv, "--seq-len", "32"])
    assert _run_pack([*argv, "--seq-len", "32"]) == first
    assert "already packed" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"differs in \['seq_len'\]\); use a new --out"):
        _run_pack([*argv, "--seq-len", "64"])
    with src.open("a") as f:
        f.write(json.dumps({"text": "document 5"}) + "\n")
    with pytest.raises(ValueError, match=r"differs in \['inputs'\]\); use a new --out"):
        _run_pack([*argv, "--seq-len", "32"])
    (tmp_path / "out" / "pack.json").unlink()  # as if killed before the end
    rep = _run_pack([*argv, "--seq-len", "32"])
    assert "unfinished run" in capsys.readouterr().out
    added = len(Tokenizer(demo_data.tokenizer).encode("document 5")) + 2
    assert rep["train"]["real_positions"] == first["train"]["real_positions"] + added
