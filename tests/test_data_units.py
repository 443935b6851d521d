"""Tokenizer, image decoding and packing: small, fast checks on real sentencepiece/PIL/packing code."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from data_pipeline import images, tokenizer
from data_pipeline.packing import IMAGE, PAIR, TEXT, Packer, Unit, best_subset

WORDS = "red green blue circle square triangle top left right bottom center the a of and at is in".split()


def _texts(n: int = 500) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(n)]


def test_tokenizer_roundtrip_and_special_ids(tmp_path):
    ids = tokenizer.train(_texts(), tmp_path / "t.model", vocab_size=80)
    assert ids == tokenizer.load_special_ids(tmp_path / "t.model") == tokenizer.load_special_ids(tmp_path / "t.json")
    specials = [ids.bos_id, ids.eos_id, ids.boi_id, ids.eoi_id, ids.pad_id]
    assert len(set(specials)) == 5 and max(specials) < ids.vocab_size
    tok = tokenizer.Tokenizer(tmp_path / "t.model")
    text = "a red circle at the top left"
    enc = tok.encode(text)
    assert not set(enc) & set(specials)
    assert tok.decode([ids.bos_id, *enc, ids.eos_id]) == text


def test_wrap_external_model_appends_missing_specials(tmp_path):
    """A model without <boi>/<eoi>/<pad> pieces (like Llama 2's) gets them appended after its vocabulary."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_texts()), model_writer=buf, vocab_size=40,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (tmp_path / "ext.model").write_bytes(buf.getvalue())
    ids = tokenizer.wrap(tmp_path / "ext.model")
    assert (ids.bos_id, ids.eos_id) == (1, 2)
    assert sorted([ids.boi_id, ids.eoi_id, ids.pad_id]) == [40, 41, 42] and ids.vocab_size == 43
    assert json.loads((tmp_path / "ext.json").read_text())["vocab_size"] == 43


def test_missing_metadata_error_names_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_pipeline.tokenizer wrap"):
        tokenizer.load_special_ids(tmp_path / "nope.model")


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt)
    return b.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "CMYK", "LA", "I;16"])
def test_modes_convert_to_rgb_and_crop(mode):
    img = Image.new("RGB", (90, 60), (200, 10, 10)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    arr = images.load_image(_png(img, fmt), 32)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert -1.0 <= arr.min() and arr.max() <= 1.0


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
    imgs = [images.load_image(synthetic.png_bytes(synthetic.draw_shape(*synthetic.random_scene(rng), 32)), 32) for _ in range(16)]
    data = torch.from_numpy(np.stack(imgs))  # (16, 3, 32, 32)
    out = vae.train_vae(data, tmp_path / "vae", steps=2, batch_size=8, latent_channels=4, width=8, sample_every=1)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["recon_000001.png", "recon_000002.png"]
    v = vae.load_vae(out)
    z = vae.encode(v, data)  # (16, 4, 4, 4)
    assert z.shape == (16, 4, 4, 4)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    assert vae.decode(v, z).shape == data.shape


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
