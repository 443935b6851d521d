"""Tokenizer, image decoding and packing: small, fast checks on real sentencepiece/PIL/packing code."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image, ImageOps

from data_pipeline import images, sources, tokenizer
from data_pipeline.packer import IMAGE, PAIR, TEXT, Packer, Unit, best_subset

WORDS = "red green blue circle square triangle top left right bottom center the a of and at is in".split()


def _texts(n: int = 500) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(n)]


def _trained(tmp_path, vocab_size: int = 400) -> tokenizer.Tokenizer:
    tokenizer.train(_texts(), tmp_path / "t.model", vocab_size=vocab_size)
    return tokenizer.Tokenizer(tmp_path / "t.model")


def test_tokenizer_roundtrip_and_special_ids(tmp_path):
    with pytest.warns(UserWarning, match="300 pieces, fewer than --vocab-size 400"):  # 19 words support no more
        tok = _trained(tmp_path)
    ids = tok.ids
    assert ids == tokenizer.load_special_ids(tmp_path / "t.model") == tokenizer.load_special_ids(tmp_path / "t.json")
    specials = [ids.bos_id, ids.eos_id, ids.boi_id, ids.eoi_id, ids.pad_id]
    assert len(set(specials)) == 5 and max(specials) < ids.vocab_size
    text = "a red circle at the top left"
    enc = tok.encode(text)
    assert not set(enc) & set(specials) and len(enc) <= 8  # whole words, not bytes
    assert tok.decode([ids.bos_id, *enc, ids.eos_id]) == text


# inputs of issue 10: code, whitespace runs, NFKC-sensitive characters, characters absent from training
ROUND_TRIP = [
    "def add(a, b):\n    return a + b",
    "col1\tcol2\t\tcol3\n\n\nnext paragraph   three spaces ",
    "  leading spaces and a trailing newline\n",
    "\ufb01 ligature, \u2460 circled, \uff21\uff22 full-width, e\u0301 combining",
    "caf\u00e9 5\u20ac \U0001f600 \u4e2d\u6587 \u0000 \u200b",
    "<boi> html-like <eoi> markup <pad> in a document about <boi>",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip_is_lossless(tmp_path, text):
    with pytest.warns(UserWarning):
        tok = _trained(tmp_path)
    enc = tok.encode(text)
    assert tok.decode(enc) == text
    ids = tok.ids
    assert not set(enc) & {ids.bos_id, ids.eos_id, ids.boi_id, ids.eoi_id, ids.pad_id}  # specials unproducible
    assert tok.sp.unk_id() not in enc  # byte fallback: nothing becomes <unk>


def test_tokenizer_trains_on_long_documents_and_reports(tmp_path):
    """Issue 10: 200 documents over 4 KB + 200 short captions; sentencepiece used to skip the long ones."""
    rng = np.random.default_rng(1)
    long_words = "photosynthesis chlorophyll mitochondria membrane protein enzyme".split()
    docs = [" ".join(rng.choice(long_words, size=900)) for _ in range(200)]  # ~9 KB each
    assert min(len(d.encode()) for d in docs) > 4096
    caps = _texts(200)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + caps))
    with pytest.warns(UserWarning, match="fewer than --vocab-size 400"):
        tokenizer.main(["train", "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "t.model"),
                        "--vocab-size", "400"])
    meta = json.loads((tmp_path / "t.json").read_text())
    assert meta["training"]["documents"] == 400 and meta["training"]["long_documents_chunked"] == 200
    assert meta["training"]["skipped_empty"] == 0 and meta["model"]["lossless"]
    tok = tokenizer.Tokenizer(tmp_path / "t.model")
    for w in long_words:  # each long-document word became one piece (was single characters or <unk>)
        assert [tok.sp.id_to_piece(i) for i in tok.encode(w)] == ["\u2581" + w]
    assert tok.decode(tok.encode(docs[0])) == docs[0]


def test_chunk_text_cuts_at_whitespace_and_keeps_every_character():
    text = ("word " * 3000) + "x" * 10000 + "\u00e9" * 5000
    chunks = tokenizer.chunk_text(text, 4096)
    assert "".join(chunks) == text and max(len(c.encode()) for c in chunks) <= 4096
    assert chunks[0].endswith(" ")


@pytest.mark.filterwarnings("ignore:.*fewer than --vocab-size")
def test_tokenizer_cli_skips_counts_and_names_bad_lines(tmp_path, capsys):
    """Issue 10: `tokenizer train` raised on one malformed jsonl line; now it skips, counts and names it like pack."""
    good = [json.dumps({"text": f"document {i}: the red circle at the top left\n\tand  its layout"}) for i in range(17)]
    lines = good[:4] + ['{"text": "cut off in the mid'] + good[4:7] + [json.dumps({"text": None})] + good[7:11] \
        + [json.dumps(["not", "an", "object"])] + good[11:]
    assert len(lines) == 20
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["train", "--input", str(tmp_path / "t.jsonl"), "--vocab-size", "300"]
    tokenizer.main([*argv, "--out", str(tmp_path / "t.model")])
    training = json.loads((tmp_path / "t.json").read_text())["training"]
    assert training["records_skipped"] == {"bad_json": 1, "no_text": 2}
    assert [(Path(n["record"]).name, n["reason"]) for n in training["named"]] == [
        ("t.jsonl:5", "bad_json"), ("t.jsonl:9", "no_text"), ("t.jsonl:14", "no_text")]
    assert (training["documents"], training["chunks"], training["named_left_out"]) == (17, 17, 0)  # every good line
    err = capsys.readouterr().err
    assert f"skipped 3 (bad_json 1, no_text 2); first: {tmp_path / 't.jsonl'}:5 (bad_json)" in err
    tok = tokenizer.Tokenizer(tmp_path / "t.model")
    assert tok.decode(tok.encode(json.loads(good[16])["text"])) == json.loads(good[16])["text"]
    with pytest.raises(ValueError, match=r"t.jsonl:5: not valid JSON"):
        tokenizer.main([*argv, "--out", str(tmp_path / "strict.model"), "--strict"])
    assert not (tmp_path / "strict.model").exists()


def test_vocab_too_small_for_bytes_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="256 byte pieces"):
        tokenizer.train(_texts(), tmp_path / "t.model", vocab_size=80)


def _external(tmp_path, **opts) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_texts()), model_writer=buf,
                                   vocab_size=opts.pop("vocab_size", 40),
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, **opts)
    (tmp_path / "ext.model").write_bytes(buf.getvalue())
    return buf.getvalue()


def test_wrap_external_model_appends_missing_specials(tmp_path):
    """A model without <boi>/<eoi>/<pad> pieces and Llama 2's options gets them appended, no warning."""
    import warnings
    _external(tmp_path, vocab_size=300, byte_fallback=True, normalization_rule_name="identity",
              remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False)
    n = spm.SentencePieceProcessor(model_file=str(tmp_path / "ext.model")).get_piece_size()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenizer.wrap(tmp_path / "ext.model")
    assert (ids.bos_id, ids.eos_id) == (1, 2)
    assert sorted([ids.boi_id, ids.eoi_id, ids.pad_id]) == [n, n + 1, n + 2] and ids.vocab_size == n + 3
    meta = json.loads((tmp_path / "ext.json").read_text())
    assert meta["vocab_size"] == n + 3 and meta["model"]["lossless"] and meta["model"]["add_dummy_prefix"]
    tok = tokenizer.Tokenizer(tmp_path / "ext.model")
    assert all(tok.decode(tok.encode(t)) == t for t in ROUND_TRIP)


def test_wrap_user_defined_boi_stays_text_and_lossy_model_warns(tmp_path):
    """An older model whose <boi> is a user-defined (producible) piece: BOI gets a new id; NFKC is warned about."""
    _external(tmp_path, user_defined_symbols=["<boi>", "<eoi>"])
    with pytest.warns(UserWarning, match="changes text"):
        ids = tokenizer.wrap(tmp_path / "ext.model")
    assert (ids.boi_id, ids.eoi_id, ids.pad_id) == (40, 41, 42)
    tok = tokenizer.Tokenizer(tmp_path / "ext.model")
    enc = tok.encode("a <boi> b <eoi>")
    assert not set(enc) & {40, 41, 42} and tok.decode(enc) == "a <boi> b <eoi>"
    assert not json.loads((tmp_path / "ext.json").read_text())["model"]["lossless"]


def test_missing_metadata_error_names_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_pipeline.tokenizer wrap"):
        tokenizer.load_special_ids(tmp_path / "nope.model")


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt)
    return b.getvalue()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def _rgb(x: np.ndarray) -> np.ndarray:
    """load_image output (3, H, W) in [-1, 1] -> (H, W, 3) 0..255 floats."""
    return (x.transpose(1, 2, 0) + 1.0) * 127.5


_GRAD = np.linspace(0.0, 1.0, 32 * 32).reshape(32, 32)  # (H, W) 0..1 ramp


def _alpha_over_white(c: float, a: np.ndarray) -> np.ndarray:
    w = a.astype(np.float64) / 255.0
    return c * w + 255.0 * (1 - w)


def _mode_case(mode: str) -> tuple[Image.Image, str, np.ndarray]:
    """(image, format, expected (H, W, 3) 0..255 as a viewer shows it), computed without the pipeline's code."""
    a = np.rint(_GRAD * 255).astype(np.uint8)  # (H, W)
    grey3 = lambda g: np.repeat(np.asarray(g, np.float64)[..., None], 3, axis=2)  # noqa: E731
    if mode == "I;16":
        v = np.rint(_GRAD * 65535).astype(np.uint16)
        return Image.fromarray(v), "PNG", grey3(v / 257.0)
    if mode == "I":
        v = np.rint(_GRAD * 65535).astype(np.int32)
        return Image.fromarray(v), "TIFF", grey3(v / 257.0)
    if mode == "F":
        return Image.fromarray(_GRAD.astype(np.float32)), "TIFF", grey3(_GRAD.astype(np.float32) * 255.0)
    if mode == "L":
        return Image.fromarray(a, "L"), "PNG", grey3(a)
    if mode == "1":
        return Image.fromarray(a > 127).convert("1"), "PNG", grey3(np.where(a > 127, 255.0, 0.0))
    if mode == "LA":
        img = Image.merge("LA", [Image.new("L", (32, 32), 40), Image.fromarray(a)])
        return img, "PNG", grey3(_alpha_over_white(40, a))
    if mode == "RGBA":
        img = Image.merge("RGBA", [Image.new("L", (32, 32), c) for c in (200, 10, 90)] + [Image.fromarray(a)])
        return img, "PNG", np.stack([_alpha_over_white(c, a) for c in (200, 10, 90)], axis=2)
    if mode in ("P", "P+transparency"):
        img = Image.fromarray(np.where(a > 127, 1, 0).astype(np.uint8), "P")
        img.putpalette([200, 10, 90, 0, 120, 255] + [0] * 762)
        exp = np.where((a > 127)[..., None], [0.0, 120.0, 255.0], [200.0, 10.0, 90.0])
        if mode == "P":
            return img, "PNG", exp
        img.info["transparency"] = 1  # colour 1 transparent: white shows through
        return img, "PNG", np.where((a > 127)[..., None], 255.0, exp)
    if mode == "CMYK":  # R = (255 - C)(255 - K) / 255, the profile-less conversion viewers use
        cmyk = [np.full((32, 32), v, np.uint8) for v in (10, 200, 100, 30)]
        exp = np.stack([np.full((32, 32), (255 - c) * (255 - 30) / 255, np.float64) for c in (10, 200, 100)], axis=2)
        return Image.merge("CMYK", [Image.fromarray(x) for x in cmyk]), "TIFF", exp
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "L", "1", "LA", "RGBA", "P", "P+transparency", "CMYK"])
def test_modes_map_by_their_real_value_range(mode):
    """Each mode as a viewer shows it: 16-bit / 257, float 0..1 x 255, alpha over white; not stretched per image."""
    img, fmt, expected = _mode_case(mode)
    data = _encode(img, fmt)
    got = _rgb(images.load_image(data, 32))  # 32 -> 32: no resampling, pixels compared directly
    assert got.shape == (32, 32, 3)
    assert np.abs(got - expected).max() <= 1.0, f"{mode}: max error {np.abs(got - expected).max()}"


@pytest.mark.parametrize("mode,values,reason", [
    ("F", np.full((32, 32), 3.5, np.float32), "unsupported_range"),  # HDR-like float: no defined 8-bit mapping
    ("I", np.full((32, 32), 70000, np.int32), "unsupported_range"),
])
def test_modes_outside_a_known_range_are_skipped_with_reason(mode, values, reason):
    with pytest.raises(images.BadImage) as e:
        img = Image.fromarray(values)
        assert img.mode == mode
        images.load_image(_encode(img, "TIFF"), 32)
    assert e.value.reason == reason


def test_16_bit_dark_image_is_not_stretched():
    """A dark 16-bit image stays dark (per-image min/max stretching made it full-range)."""
    v = np.full((32, 32), 1000, np.uint16)
    v[0, 0] = 2000
    got = _rgb(images.load_image(_encode(Image.fromarray(v), "PNG"), 32))
    assert abs(got[5, 5, 0] - 1000 / 257) <= 1.0 and abs(got[0, 0, 0] - 2000 / 257) <= 1.0


def _upright() -> np.ndarray:
    """A portrait (H=48, W=32) picture whose corners differ: red top-left, blue bottom-right."""
    u = np.full((48, 32, 3), 128, np.uint8)
    u[:12, :8] = (255, 0, 0)
    u[-12:, -8:] = (0, 0, 255)
    u[20:28, 10:14] = (0, 255, 0)
    return u


def _stored_for(u: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that a viewer applying EXIF `orientation` shows `u` (EXIF 2.3, tag 0x0112)."""
    t = np.transpose(u, (1, 0, 2))
    return {1: u, 2: u[:, ::-1], 3: u[::-1, ::-1], 4: u[::-1], 5: t, 6: np.rot90(u, 1), 7: t[::-1, ::-1],
            8: np.rot90(u, -1)}[orientation]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_before_crop(orientation):
    """Issue 10: an orientation-6 photo (stored landscape, shown portrait) was encoded rotated and cropped wrongly."""
    u = _upright()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(np.ascontiguousarray(_stored_for(u, orientation))), "PNG", exif=exif)
    viewer = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))  # the viewer reference
    assert np.array_equal(viewer, u)
    want = images.load_image(_encode(Image.fromarray(u), "PNG"), 16)
    assert np.array_equal(images.load_image(data, 16), want)


def test_exif_rotated_jpeg_phone_photo():
    """A JPEG stored landscape with orientation 6: encoded upright (portrait), like the viewer shows it."""
    u = _upright()
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(np.ascontiguousarray(_stored_for(u, 6))), "JPEG", exif=exif, quality=95)
    got = _rgb(images.load_image(data, 32))  # shorter side 32 = the portrait width: crop is vertical
    want = _rgb(images.load_image(_encode(Image.fromarray(u), "JPEG", quality=95), 32))
    assert np.abs(got - want).mean() < 3.0
    assert got[:2, :4, 0].mean() > 200 and got[-2:, -4:, 2].mean() > 200  # red top-left, blue bottom-right


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not_an_image"),
    (_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "truncated"),
    (_png(Image.new("RGB", (1, 1))), "too_small"),
    (_png(Image.new("RGB", (400, 20))), "bad_aspect_ratio"),
    (_png(Image.new("1", (9000, 9000))), "decompression_bomb"),
])
def test_bad_images_raise_with_reason(data, reason):
    with pytest.raises(images.BadImage) as e:
        images.load_image(data, 32)
    assert e.value.reason == reason


def test_best_subset_fills_exactly():
    lens = [270, 281, 275, 300, 266, 290, 280, 279]
    pick = best_subset(lens, 1100)
    assert len(set(pick)) == len(pick)
    assert sum(lens[i] for i in pick) == 1100  # 275 + 266 + 280 + 279
    assert sum(lens[i] for i in best_subset(lens, 500)) == 300  # no pair fits 500: best single



def test_packing_efficiency_and_invariants():
    """Long-tailed texts, 256-patch pairs and interleaved docs: >= 99% real positions, images whole."""
    rng = np.random.default_rng(0)
    lat = np.zeros((8, 32, 32), np.float16)
    docs = []
    for _ in range(3000):
        r = rng.random()
        if r < 0.5:
            docs.append([Unit(TEXT, list(range(int(rng.lognormal(5.5, 1.2)) + 2)))])
        elif r < 0.9:
            docs.append([Unit(PAIR, list(range(int(rng.integers(5, 60)))), lat)])
        else:
            docs.append([Unit(TEXT, [1, 5, 6]), Unit(IMAGE, [], lat), Unit(TEXT, [7] * int(rng.integers(1, 300)))])
    packer = Packer(4096, 256)
    n_text = sum(len(u.tokens) for d in docs for u in d)
    n_img = sum(u.kind != TEXT for d in docs for u in d)
    got_text = got_img = 0
    for row in packer.pack(docs):
        assert row.used <= 4096
        got_text += len(row.tokens)
        got_img += len(row.latents)
    assert (got_text, got_img) == (n_text, n_img)  # nothing lost, nothing duplicated
    assert packer.efficiency >= 0.99, packer.efficiency


@pytest.mark.parametrize("stage", ["tokenizer", "vae", "precompute", "pack", "demo_data"])
def test_stage_help(stage, capsys):
    """Every stage documents itself with --help."""
    import importlib

    mod = importlib.import_module(f"data_pipeline.{stage}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert "usage: python -m data_pipeline." + stage in capsys.readouterr().out


def test_vae_train_records_unit_variance_stats(tmp_path):
    """A few VAE steps write recon PNGs and a config whose shift/scale make the latents unit-variance."""
    import torch

    from data_pipeline import synthetic, vae

    rng = np.random.default_rng(0)
    imgs = [images.load_image(synthetic.png_bytes(synthetic.draw_shape(*synthetic.random_scene(rng), 32)), 32)
            for _ in range(16)]
    data = torch.from_numpy(np.stack(imgs))  # (16, 3, 32, 32)
    out = vae.train_vae(data, tmp_path / "vae",
                        vae.VaeTrainSettings(steps=2, batch_size=8, latent_channels=4, width=8, sample_every=1))
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["recon_000001.png", "recon_000002.png"]
    v = vae.load_vae(out)
    z = vae.encode(v, data)  # (16, 4, 4, 4)
    assert z.shape == (16, 4, 4, 4)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    assert vae.decode(v, z).shape == data.shape


def test_vae_inputs_skipped_counted_named_and_reported(tmp_path, capsys):
    """Issue 10: VAE training skipped bad records and images silently; now by reason in its report and on stderr."""
    from data_pipeline import synthetic, vae

    rng = np.random.default_rng(0)
    for i in range(6):
        synthetic.draw_shape(*synthetic.random_scene(rng), 32).save(tmp_path / f"ok{i}.png")
    (tmp_path / "corrupt.png").write_bytes(synthetic.png_bytes(Image.new("RGB", (32, 32), (9, 9, 9)))[:60])  # cut short
    rec = [json.dumps({"image": f"ok{i}.png", "caption": f"shape {i}"}) for i in range(6)]
    lines = rec[:2] + [json.dumps({"image": "corrupt.png", "caption": "corrupt"})] + rec[2:4] \
        + [json.dumps({"image": "no/such.png", "caption": "missing"}), '{"image": "ok0.png", "capt'] + rec[4:]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "vae"
    vae.main(["--input", str(tmp_path / "pairs.jsonl"), "--out", str(out), "--image-size", "32", "--steps", "1",
              "--batch-size", "4", "--latent-channels", "4", "--width", "8", "--sample-every", "1"])
    report = json.loads((out / "latent_stats.json").read_text())
    assert report["images_used"] == 6 and report["latent_noise"] == vae.recipe_for(32).latent_noise  # on record
    assert report["skipped"] == {"bad_json": 1, "missing_file": 1, "truncated": 1}
    assert [(Path(n["record"]).name, n["reason"]) for n in report["named"]] == [
        ("pairs.jsonl:3", "truncated"), ("pairs.jsonl:6", "missing_file"), ("pairs.jsonl:7", "bad_json")]
    assert "[vae] inputs: skipped 3 (bad_json 1, missing_file 1, truncated 1)" in capsys.readouterr().err
    skips = sources.SkipLog()  # the library call counts the same way
    assert vae.load_images([str(tmp_path / "pairs.jsonl")], 32, skips=skips).shape == (6, 3, 32, 32)
    assert skips.to_json("skipped") == {k: report[k] for k in ("skipped", "named", "named_left_out")}


def test_weighted_l1_emphasises_pixels_off_the_dominant_colour():
    """fg_weight scales the error on object pixels (off the median colour) relative to the background."""
    import torch

    from data_pipeline.vae import weighted_l1

    x = torch.ones(1, 3, 8, 8)  # white image
    x[:, :, :2, :2] = -1.0  # a 2x2 black object: 4 of 64 pixels
    rec = x.clone()
    rec[:, :, 0, 0] = 1.0  # wrong on one object pixel (error 2 per channel)
    plain = weighted_l1(rec, x, 1.0)
    assert torch.isclose(plain, torch.tensor(2 * 3 / (3 * 64)))
    heavy = weighted_l1(rec, x, 10.0)  # weights: 4 object pixels x 10 + 60 x 1 = 100
    assert torch.isclose(heavy, torch.tensor(10 * 2 * 3 / (3 * 100)))


def test_noise_latents_scales_with_the_batch_std_per_image_and_passes_gradients_straight():
    """noise_latents: tau ~ U(0, max) per image times the batch std, a no-op at 0, and d out / d z = I
    (the std is detached: scaling the latents up cannot shrink the noise the decoder sees)."""
    import torch

    from data_pipeline.vae import noise_latents

    z = 3.0 * torch.randn(2000, 4, 8, 8)  # batch std 3
    assert noise_latents(z, 0.0) is z
    g = torch.Generator().manual_seed(0)
    d = noise_latents(z, 0.6, g) - z  # (2000, 4, 8, 8)
    per_image = d.flatten(1).std(dim=1) / z.std()  # tau of each image, ~U(0, 0.6)
    assert per_image.max() <= 0.6 * 1.25 and per_image.min() < 0.05  # whole range, none above the max
    assert abs(per_image.mean().item() - 0.3) < 0.02  # E[tau] = max / 2
    assert abs((d.std() / z.std()).item() - 0.6 / 3**0.5) < 0.02  # sqrt(E[tau^2]) = max / sqrt(3)
    zz = z[:8].clone().requires_grad_(True)
    noise_latents(zz, 0.6, g).sum().backward()
    assert torch.equal(zz.grad, torch.ones_like(zz))  # a mutant without detach() adds a std term here


def test_vae_training_refuses_a_negative_latent_noise(tmp_path):
    """A negative latent_noise is an error naming the argument, before any file is written."""
    import pytest
    import torch

    from data_pipeline import vae

    with pytest.raises(ValueError, match="latent_noise=-0.1"):
        vae.train_vae(torch.zeros(4, 3, 16, 16), tmp_path / "vae", vae.VaeTrainSettings(steps=1, latent_noise=-0.1))
    assert not (tmp_path / "vae").exists()


def test_clean_stale_shm_keeps_live_segments_and_honours_switch(monkeypatch):
    """Only streaming segments no live process maps and none just created are removed; TRANSFUSION_CLEAN_SHM=0 removes
    nothing."""
    import os
    import time
    from multiprocessing import resource_tracker, shared_memory
    from data_pipeline import loader
    live = shared_memory.SharedMemory("999990_locals", create=True, size=64)  # mapped by this process
    os.utime("/dev/shm/999990_locals", (time.time() - 3600,) * 2)  # old, but mapped: live
    dead = shared_memory.SharedMemory("999991_locals", create=True, size=64)
    dead.close()  # no process maps it: what a crashed job leaves, or a job that has not mapped it yet
    resource_tracker.unregister(dead._name, "shared_memory")
    try:
        monkeypatch.setattr(loader, "_CLEANED", False)
        monkeypatch.setenv("TRANSFUSION_CLEAN_SHM", "0")
        loader._clean_once()
        assert Path("/dev/shm/999991_locals").exists()
        assert not {"999990_locals", "999991_locals"} & set(loader.clean_stale_shm())  # the unmapped one is fresh
        os.utime("/dev/shm/999991_locals", (time.time() - 2 * loader.STALE_AFTER_S,) * 2)
        removed = loader.clean_stale_shm()
        assert "999991_locals" in removed and "999990_locals" not in removed
        assert not Path("/dev/shm/999991_locals").exists() and Path("/dev/shm/999990_locals").exists()
    finally:
        live.close()
        live.unlink()
        Path("/dev/shm/999991_locals").unlink(missing_ok=True)
