"""Readers for the raw inputs users have: text (jsonl / txt), image-caption pairs (jsonl, a folder of
images with caption side files, webdataset tars as img2dataset writes) and interleaved jsonl.

Image sources are split into deterministic *parts* (a jsonl line range, a folder file range, one
tar) so that precompute can spread them over ranks and resume part by part.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

SourceKind = Literal["pairs", "interleaved"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_KEYS = ("caption", "text", "txt")


@dataclass
class Record:
    """One document with images: ordered ("text", str) / ("image", bytes | None) segments.

    An image is None when its file could not be read (counted as `missing`).
    """

    key: str
    kind: SourceKind
    segments: list[tuple[str, object]]


@dataclass(frozen=True)
class Part:
    """A deterministic slice of one input file: lines/files [start, stop) or a whole tar (stop=-1)."""

    path: str
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{Path(self.path).name}:{self.start}-{self.stop}"


def expand(inputs: list[str]) -> list[str]:
    """Expand globs; each input must match something (error names it)."""
    out: list[str] = []
    for pat in inputs:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if os.path.exists(pat) else [])
        if not hits:
            raise FileNotFoundError(f"{pat}: no such input file or directory")
        out += hits
    return out


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _folder_images(path: str) -> list[str]:
    return sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def list_parts(inputs: list[str], part_size: int = 1000) -> list[Part]:
    """All parts of the given inputs, in a fixed order (independent of the number of ranks)."""
    parts: list[Part] = []
    for path in expand(inputs):
        if path.endswith(".tar"):
            parts.append(Part(path, 0, -1))
            continue
        n = len(_folder_images(path)) if os.path.isdir(path) else _count_lines(path)
        parts += [Part(path, s, min(s + part_size, n)) for s in range(0, n, part_size)]
    return parts


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _caption_of(rec: dict, where: str) -> str:
    for k in CAPTION_KEYS:
        if isinstance(rec.get(k), str):
            return rec[k]
    raise ValueError(f"{where}: no caption field (one of {CAPTION_KEYS})")


def _jsonl_record(line: str, base: Path, kind: SourceKind, where: str) -> Record:
    """Parse one jsonl line: a pair {'image': path, 'caption': str} or {'segments': [...]} / a list."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); fix or remove the line") from e
    if kind == "pairs":
        if "image" not in rec:
            raise ValueError(f"{where}: field 'image' (path relative to the jsonl) missing")
        return Record(where, kind, [("text", _caption_of(rec, where)), ("image", _read_bytes(base / rec["image"]))])
    segs_in = rec if isinstance(rec, list) else rec.get("segments")
    if not isinstance(segs_in, list):
        raise ValueError(f"{where}: an interleaved record is a list of segments or {{'segments': [...]}}")
    segs: list[tuple[str, object]] = []
    for s in segs_in:
        if isinstance(s, dict) and isinstance(s.get("text"), str):
            segs.append(("text", s["text"]))
        elif isinstance(s, dict) and isinstance(s.get("image"), str):
            segs.append(("image", _read_bytes(base / s["image"])))
        elif not (isinstance(s, dict) and s.get("text") is None and s.get("image") is None):
            raise ValueError(f"{where}: segment {s!r} needs 'text' or 'image'")
    return Record(where, kind, segs)


def _read_jsonl(part: Part, kind: SourceKind) -> Iterator[Record]:
    base = Path(part.path).parent
    i = 0
    with open(part.path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            if part.start <= i < part.stop:
                yield _jsonl_record(line, base, kind, f"{part.path}:{i + 1}")
            i += 1
            if i >= part.stop:
                return


def _side_caption(img: Path) -> str | None:
    for ext in (".txt", ".json"):
        side = img.with_suffix(ext)
        if side.is_file():
            raw = side.read_text(encoding="utf-8")
            return raw.strip() if ext == ".txt" else _caption_of(json.loads(raw), str(side))
    return None


def _read_folder(part: Part) -> Iterator[Record]:
    for p in _folder_images(part.path)[part.start : part.stop]:
        cap = _side_caption(Path(p))
        if cap is None:
            raise ValueError(f"{p}: no caption side file ({Path(p).stem}.txt or .json with 'caption')")
        yield Record(p, "pairs", [("text", cap), ("image", _read_bytes(Path(p)))])


def _read_tar(part: Part) -> Iterator[Record]:
    """Webdataset tar: members grouped by key (name up to the first dot), image + txt/json caption."""
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(part.path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{part.path}: corrupt webdataset tar ({e}); re-download or drop this shard") from e
    for key in order:
        g = groups[key]
        img = next((g[e] for e in IMAGE_EXTS if e in g), None)
        if img is None:
            continue
        if ".txt" in g:
            cap = g[".txt"].decode("utf-8", "replace").strip()
        elif ".json" in g:
            cap = _caption_of(json.loads(g[".json"]), f"{part.path}:{key}.json")
        else:
            continue
        yield Record(f"{part.path}:{key}", "pairs", [("text", cap), ("image", img)])


def read_part(part: Part, kind: SourceKind) -> Iterator[Record]:
    """Records of one part, in order."""
    if part.path.endswith(".tar"):
        return _read_tar(part)
    if os.path.isdir(part.path):
        return _read_folder(part)
    return _read_jsonl(part, kind)


def iter_texts(inputs: list[str]) -> Iterator[str]:
    """Text documents: the 'text' field of each .jsonl line, or one whole .txt file per document."""
    for path in expand(inputs):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.suffix in (".txt", ".jsonl")) if os.path.isdir(path) else [path]
        for fp in files:
            if fp.endswith(".jsonl"):
                with open(fp, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                text = json.loads(line)["text"]
                            except (json.JSONDecodeError, KeyError, TypeError) as e:
                                raise ValueError(f"{fp}:{n}: expected a JSON object with a 'text' field ({e})") from e
                            yield text
            else:
                yield Path(fp).read_text(encoding="utf-8")
