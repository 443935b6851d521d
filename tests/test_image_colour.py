"""Issue 27.5: pixels as a viewer shows them, round two: wide-gamut ICC profiles and animated images.

The ICC profiles are written here byte by byte (ICC.1:2001-04, v2.1 display class, matrix/TRC): the
colorants are computed from each space's published primaries and white point, adapted to the D50 PCS
with the Bradford matrix. The expected pixels come from an independent path: the spaces' published
RGB -> XYZ matrices (Lindbloom's tables of the Adobe RGB (1998) and ROMM/ProPhoto specs) and the sRGB
standard (IEC 61966-2-1) in numpy, with no littleCMS involved.
"""

from __future__ import annotations

import io
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from data_pipeline import images

D50 = np.array([0.9642, 1.0, 0.8249])
BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in xyz)


def _colorants(primaries: list[tuple[float, float]], white_xy: tuple[float, float]) -> np.ndarray:
    """(3, 3) columns = the primaries' XYZ under `white`, adapted to D50 by Bradford (ICC.1 Annex E)."""
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries]).T  # (3, 3) columns R, G, B
    wx, wy = white_xy
    white = np.array([wx / wy, 1.0, (1 - wx - wy) / wy])
    m = xyz * np.linalg.solve(xyz, white)  # scale the columns so R + G + B = white
    cone = np.diag((BRADFORD @ D50) / (BRADFORD @ white))
    return np.linalg.inv(BRADFORD) @ cone @ BRADFORD @ m


def icc_profile(name: str, primaries, white_xy, gamma: float) -> bytes:
    """A real ICC v2.1 RGB display profile (matrix + one gamma curve per channel) that littleCMS reads."""
    m = _colorants(primaries, white_xy)
    wx, wy = white_xy
    desc = name.encode() + b"\0"
    g = struct.pack(">I", 1) + struct.pack(">H", round(gamma * 256)) + b"\0\0"  # u8Fixed8 gamma, padded
    tags = [
        (b"desc", b"desc" + b"\0" * 4 + struct.pack(">I", len(desc)) + desc + b"\0" * 8 + b"\0" * 3 + b"\0" * 67),
        (b"cprt", b"text" + b"\0" * 4 + b"No copyright, test profile\0"),
        (b"wtpt", _xyz_tag([wx / wy, 1.0, (1 - wx - wy) / wy])),
        (b"rXYZ", _xyz_tag(m[:, 0])), (b"gXYZ", _xyz_tag(m[:, 1])), (b"bXYZ", _xyz_tag(m[:, 2])),
        (b"rTRC", b"curv" + b"\0" * 4 + g), (b"gTRC", b"curv" + b"\0" * 4 + g), (b"bTRC", b"curv" + b"\0" * 4 + g),
    ]
    table, data = b"", b""
    off = 128 + 4 + 12 * len(tags)
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", off + len(data), len(body))
        data += body
    size = off + len(data)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr" + b"RGB " + b"XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + b"".join(_s15(v) for v in D50) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


ADOBE = icc_profile("Adobe RGB (1998) test", [(0.64, 0.33), (0.21, 0.71), (0.15, 0.06)], (0.3127, 0.3290), 563 / 256)
PROPHOTO = icc_profile("ProPhoto RGB test", [(0.7347, 0.2653), (0.1596, 0.8404), (0.0366, 0.0001)],
                       (0.3457, 0.3585), 1.8)

# independent reference: published RGB -> XYZ matrices (brucelindbloom.com), sRGB per IEC 61966-2-1
ADOBE_TO_XYZ_D65 = np.array([[0.5767309, 0.1855540, 0.1881852], [0.2973769, 0.6273491, 0.0752741],
                             [0.0270343, 0.0706872, 0.9911085]])
PROPHOTO_TO_XYZ_D50 = np.array([[0.7976749, 0.1351917, 0.0313534], [0.2880402, 0.7118741, 0.0000857],
                                [0.0, 0.0, 0.8252100]])
BRADFORD_D50_TO_D65 = np.array([[0.9555766, -0.0230393, 0.0631636], [-0.0282895, 1.0099416, 0.0210077],
                                [0.0122982, -0.0204830, 1.3299098]])
XYZ_D65_TO_SRGB = np.array([[3.2404542, -1.5371385, -0.4985314], [-0.9692660, 1.8760108, 0.0415560],
                            [0.0556434, -0.2040259, 1.0572252]])
TO_XYZ_D65 = {"adobe": (ADOBE_TO_XYZ_D65, 563 / 256),
              "prophoto": (BRADFORD_D50_TO_D65 @ PROPHOTO_TO_XYZ_D50, 461 / 256)}
PROFILES = {"adobe": ADOBE, "prophoto": PROPHOTO}


def reference_srgb(rgb: np.ndarray, space: str) -> np.ndarray:
    """(..., 3) uint8 in `space` -> (..., 3) float sRGB 0..255 (out-of-gamut colours clipped in linear light)."""
    to_xyz, gamma = TO_XYZ_D65[space]
    lin = (rgb / 255.0) ** gamma @ to_xyz.T @ XYZ_D65_TO_SRGB.T  # (..., 3) linear sRGB
    lin = np.clip(lin, 0.0, 1.0)
    enc = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return enc * 255.0


def _pixels(x: np.ndarray) -> np.ndarray:
    """load_image output (3, H, W) in [-1, 1] -> (H, W, 3) 0..255 floats."""
    return (x.transpose(1, 2, 0) + 1.0) * 127.5


def _scene(seed: int = 0) -> np.ndarray:
    """(32, 32, 3) uint8: saturated and pale colours, greys and a ramp (many out of sRGB's gamut)."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    u[:4] = np.linspace(0, 255, 32).astype(np.uint8)[None, :, None]  # grey ramp
    u[4:8, :8] = (255, 0, 0)
    u[4:8, 8:16] = (0, 255, 0)
    u[4:8, 16:24] = (0, 0, 255)
    return u


def _save(u: np.ndarray, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(u).save(b, fmt, **kw)
    return b.getvalue()


def test_profiles_are_real_icc_that_lcms_reads():
    """The hand-written profiles parse in littleCMS as matrix-shaper RGB profiles with our primaries."""
    for data, name in ((ADOBE, "Adobe RGB (1998) test"), (PROPHOTO, "ProPhoto RGB test")):
        p = ImageCms.ImageCmsProfile(io.BytesIO(data)).profile
        assert (p.xcolor_space, p.is_matrix_shaper, p.profile_description) == ("RGB ", True, name)
    red = ImageCms.ImageCmsProfile(io.BytesIO(ADOBE)).profile.red_primary[1]  # xyY of the red colorant
    assert abs(red[0] - 0.64) < 0.01 and abs(red[1] - 0.33) < 0.01


@pytest.mark.parametrize("space", ["adobe", "prophoto"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_wide_gamut_icc_converted_to_srgb(space, fmt):
    """A PNG/JPEG tagged Adobe RGB or ProPhoto decodes to the sRGB a colour-managed viewer shows: within 1 level
    of the independent numpy conversion, where reading the numbers as sRGB (the old decoder) is off by 10-23 on
    average."""
    u = _scene()
    kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    data = _save(u, fmt, icc_profile=PROFILES[space], **kw)
    # (32, 32, 3): the file's numbers (JPEG: after loss)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    want = reference_srgb(stored.astype(np.float64), space)
    notes: Counter = Counter()
    got = _pixels(images.load_image(data, 32, notes=notes))  # 32 -> 32: no resampling
    err = np.abs(got - want)
    assert err.max() <= 1.0 and err.mean() < 0.3, (err.max(), err.mean())
    naive = np.abs(stored - want)
    # the test can fail: reading the numbers as sRGB is far off
    assert naive.mean() > 5 and naive.max() > 100, naive.mean()
    assert notes == Counter(icc_to_srgb=1)


def test_icc_with_alpha_converts_colour_then_composites_on_white():
    """RGBA + Adobe RGB: colour converted per pixel with alpha kept, then composited on white (as browsers do)."""
    u = _scene(1)
    a = np.full((32, 32, 1), 128, dtype=np.uint8)
    a[:, :8] = 255
    data = _save(np.concatenate([u, a], axis=-1), "PNG", icc_profile=ADOBE)
    conv = reference_srgb(u.astype(np.float64), "adobe")
    alpha = a / 255.0
    want = conv * alpha + 255.0 * (1 - alpha)
    err = np.abs(_pixels(images.load_image(data, 32)) - want)
    assert err.max() <= 1.5, err.max()


def test_srgb_tagged_image_is_unchanged_within_rounding():
    u = _scene(2)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    got = _pixels(images.load_image(_save(u, "PNG", icc_profile=srgb), 32))
    assert np.abs(got - u).max() <= 1.0


@pytest.mark.parametrize("icc, reason", [(b"not a profile at all", "bad_icc_profile"),
                                         (ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes(),
                                          "icc_mismatch")])
def test_unusable_icc_profile_is_skipped_with_reason(icc, reason):
    with pytest.raises(images.BadImage) as e:
        images.load_image(_save(_scene(), "PNG", icc_profile=icc), 32)
    assert e.value.reason == reason


def _frames() -> list[np.ndarray]:
    """Frame 0 blank white; frame 1 a red square on white; frame 2 adds a blue bar (each frame is the full picture)."""
    f0 = np.full((32, 32, 3), 255, dtype=np.uint8)
    f1 = f0.copy()
    f1[8:20, 8:20] = (255, 0, 0)
    f2 = f1.copy()
    f2[24:28, 2:30] = (0, 0, 255)
    return [f0, f1, f2]


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(f) for f in _frames()]
    b = io.BytesIO()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(b, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    return b.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])  # PNG = APNG
def test_animated_image_skipped_by_default_or_chosen_frame_composited(fmt):
    """Default: `animated` (the old decoder took frame 0, here blank). With animated_frame=K: the whole picture of
    frame K, although the writers store later frames as the changed region only (so compositing is needed)."""
    data = _animated(fmt)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    with pytest.raises(images.BadImage) as e:
        images.load_image(data, 32)
    assert e.value.reason == "animated" and "3 frames" in str(e.value)
    for k, want in enumerate(_frames()):
        notes: Counter = Counter()
        got = _pixels(images.load_image(data, 32, animated_frame=k, notes=notes))
        assert np.abs(got - want).max() <= 0.5, (fmt, k)
        assert notes == Counter(animated_frame=1)
    with pytest.raises(images.BadImage, match="3 frames, frame 3 asked"):
        images.load_image(data, 32, animated_frame=3)


def test_precompute_report_counts_conversions_and_names_animated(tmp_path: Path):
    """precompute's report: ICC conversions under `converted`, animated images under `skipped` and named;
    --animated-frame K encodes them and counts them under `converted` instead."""
    import torch

    from data_pipeline import precompute, vae

    data = torch.from_numpy(np.stack([images.load_image(_save(_scene(i), "PNG"), 32) for i in range(4)]))
    vae_dir = vae.train_vae(data, tmp_path / "vae",
                            vae.VaeTrainSettings(steps=1, batch_size=4, latent_channels=4, width=8, sample_every=1))
    (tmp_path / "wide.png").write_bytes(_save(_scene(), "PNG", icc_profile=ADOBE))
    (tmp_path / "photo.jpg").write_bytes(_save(_scene(1), "JPEG", icc_profile=PROPHOTO))
    (tmp_path / "plain.png").write_bytes(_save(_scene(2), "PNG"))
    (tmp_path / "anim.gif").write_bytes(_animated("GIF"))
    rows = [{"image": n, "caption": f"caption {n}"} for n in ("wide.png", "photo.jpg", "plain.png", "anim.gif")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out: str, *extra: str) -> dict:
        argv = ["--input", str(tmp_path / "pairs.jsonl"), "--vae", str(vae_dir), "--out", str(tmp_path / out),
                "--image-size", "32", "--decode-threads", "2", *extra]
        return precompute.run(precompute.PrecomputeOptions(**vars(precompute.build_parser().parse_args(argv))), (0, 1))

    rep = run("skip")
    assert (rep["encoded"], rep["records_written"]) == (3, 3)
    assert rep["skipped"] == {"animated": 1} and rep["converted"] == {"icc_to_srgb": 2}
    assert [(Path(n["record"]).name, n["reason"]) for n in rep["named"]] == [("pairs.jsonl:4", "animated")]
    rep = run("frame", "--animated-frame", "1")
    assert (rep["encoded"], rep["skipped"]) == (4, {})
    assert rep["converted"] == {"animated_frame": 1, "icc_to_srgb": 2}


def accuracy_table() -> str:
    """The figures docs/data.md quotes: `python tests/test_image_colour.py` prints them."""
    rows = ["| space | file | decoded vs numpy reference: max / mean levels | read as sRGB vs reference: max / mean |",
            "|---|---|---|---|"]
    for space in ("adobe", "prophoto"):
        for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 95, "subsampling": 0})):
            data = _save(_scene(), fmt, icc_profile=PROFILES[space], **kw)
            stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float64)
            want = reference_srgb(stored, space)
            e, n = np.abs(_pixels(images.load_image(data, 32)) - want), np.abs(stored - want)
            rows.append(f"| {space} | {fmt} | {e.max():.2f} / {e.mean():.3f} | {n.max():.0f} / {n.mean():.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(accuracy_table())
