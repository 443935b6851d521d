"""Readers for the raw inputs users have: text (jsonl / txt), image-caption pairs (jsonl, a folder of
images with caption side files, webdataset tars as img2dataset writes) and interleaved jsonl.

Image sources are split into deterministic *parts* (a jsonl line range, a folder file range, one
tar) so that precompute can spread them over ranks and resume part by part.

A malformed record never stops a reader: it is yielded as a `Record` with `skipped` set to a short
reason (`bad_json`, `not_utf8`, `no_image_field`, `no_caption`, `empty_caption`, `caption_not_utf8`,
`bad_segment`, `no_image`) and `detail`, which precompute counts and names in its report.
A caption that is not UTF-8 is repaired instead when `caption_fallback` names an encoding
(e.g. "cp1252"); the record's `repaired` says so.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

SourceKind = Literal["pairs", "interleaved"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_KEYS = ("caption", "text", "txt")


@dataclass
class Record:
    """One document with images: ordered ("text", str) / ("image", bytes | None) segments.

    An image is None when its file could not be read (counted as `missing`). A record that could
    not be parsed has no segments and `skipped` = the reason (`detail` says more); `repaired` names
    a repair made to it (e.g. "caption_cp1252").
    """

    key: str
    kind: SourceKind
    segments: list[tuple[str, object]]
    skipped: str = ""
    detail: str = ""
    repaired: str = ""


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is a short key for the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


NAMED_MAX = 10_000  # skipped records named in a report; later ones are only counted


@dataclass
class SkipLog:
    """Skipped records: counts per reason and the first NAMED_MAX by name ([{"record", "reason", "detail"?}])."""

    counts: Counter = field(default_factory=Counter)
    named: list = field(default_factory=list)
    named_left_out: int = 0

    def add(self, record: str, reason: str, detail: str = "", count: bool = True) -> None:
        """Count (unless `count` is False) and name one skip."""
        if count:
            self.counts[reason] += 1
        if len(self.named) < NAMED_MAX:
            self.named.append({"record": record, "reason": reason, **({"detail": detail} if detail else {})})
        else:
            self.named_left_out += 1

    def to_json(self, counts_key: str = "records_skipped") -> dict:
        """The report keys every stage writes: {counts_key: {reason: n}, "named": [...], "named_left_out": n}."""
        return {counts_key: dict(sorted(self.counts.items())), "named": self.named, "named_left_out": self.named_left_out}

    def summary(self, what: str) -> str:
        """One log line: `<what>: skipped N (reason n, ...); first: <record> (<reason>)`; "" when nothing was skipped."""
        n = sum(self.counts.values())
        if not n:
            return ""
        by = ", ".join(f"{r} {c}" for r, c in sorted(self.counts.items()))
        first = f"; first: {self.named[0]['record']} ({self.named[0]['reason']})" if self.named else ""
        return f"{what}: skipped {n} ({by}){first}"

    def merge(self, named: list[dict], left_out: int) -> None:
        """Append the names of another log (its counts are summed by the caller)."""
        for n in named:
            self.add(n["record"], n["reason"], n.get("detail", ""), count=False)
        self.named_left_out += left_out


def _guarded(key: str, kind: SourceKind, make) -> Record:
    """`make()` or, when it raises BadRecord, a skipped Record naming the reason."""
    try:
        return make()
    except BadRecord as e:
        return Record(key, kind, [], skipped=e.reason, detail=e.detail)


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


def file_stamp(path: str | Path) -> list:
    """[resolved path, size in bytes, mtime in ns] of a file: cheap evidence that it is unchanged."""
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def part_fingerprint(part: Part) -> str:
    """sha256 identifying what a part reads: its jsonl lines' bytes, its folder files' stamps, or its tar's stamp.

    A jsonl part hashes its own lines, so lines appended to the file leave earlier parts valid.
    """
    h = hashlib.sha256(json.dumps([str(Path(part.path).resolve()), part.start, part.stop]).encode())
    if part.path.endswith(".tar"):
        h.update(json.dumps(file_stamp(part.path)).encode())
    elif os.path.isdir(part.path):
        for p in _folder_images(part.path)[part.start : part.stop]:
            sides = [file_stamp(s) for s in (Path(p).with_suffix(".txt"), Path(p).with_suffix(".json")) if s.is_file()]
            h.update(json.dumps([file_stamp(p), sides]).encode())
    else:
        with open(part.path, "rb") as f:
            lines = (line for line in f if line.strip())
            for i, line in enumerate(lines):
                if i >= part.stop:
                    break
                if i >= part.start:
                    h.update(line.rstrip(b"\r\n") + b"\n")
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _caption_of(rec: object, where: str) -> str:
    """The caption of a parsed JSON object; BadRecord `no_caption` / `empty_caption` otherwise."""
    if not isinstance(rec, dict):
        raise BadRecord("bad_json", f"{where}: expected a JSON object, got {type(rec).__name__}")
    for k in CAPTION_KEYS:
        if isinstance(rec.get(k), str):
            if not rec[k].strip():
                raise BadRecord("empty_caption", f"{where}: field '{k}' is empty")
            return rec[k]
    raise BadRecord("no_caption", f"{where}: no string caption field (one of {CAPTION_KEYS}); got keys {sorted(rec)[:8]}")


def decode_caption(raw: bytes, where: str, fallback: str | None) -> tuple[str, str]:
    """UTF-8 text of caption bytes -> (text, repair made or ""); BadRecord `caption_not_utf8` without a fallback."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        if fallback:
            return raw.decode(fallback, "replace"), f"caption_{fallback}"
        raise BadRecord("caption_not_utf8", f"{where}: {e}; set --caption-fallback-encoding (e.g. cp1252) to repair") from e


def _parse_json(raw: bytes, where: str) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRecord("not_utf8", f"{where}: {e}") from e
    except json.JSONDecodeError as e:
        raise BadRecord("bad_json", f"{where}: not valid JSON ({e})") from e


def _jsonl_record(line: bytes, base: Path, kind: SourceKind, where: str) -> Record:
    """Parse one jsonl line: a pair {'image': path, 'caption': str} or {'segments': [...]} / a list.

    Raises BadRecord (reason `bad_json`, `not_utf8`, `no_image_field`, `no_caption`, `empty_caption`, `bad_segment`).
    """
    rec = _parse_json(line, where)
    if kind == "pairs":
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise BadRecord("no_image_field", f"{where}: field 'image' (path relative to the jsonl) missing")
        return Record(where, kind, [("text", _caption_of(rec, where)), ("image", _read_bytes(base / rec["image"]))])
    segs_in = rec if isinstance(rec, list) else rec.get("segments") if isinstance(rec, dict) else None
    if not isinstance(segs_in, list):
        raise BadRecord("bad_segment", f"{where}: an interleaved record is a list of segments or {{'segments': [...]}}")
    segs: list[tuple[str, object]] = []
    for s in segs_in:
        if isinstance(s, dict) and isinstance(s.get("text"), str):
            segs.append(("text", s["text"]))
        elif isinstance(s, dict) and isinstance(s.get("image"), str):
            segs.append(("image", _read_bytes(base / s["image"])))
        elif not (isinstance(s, dict) and s.get("text") is None and s.get("image") is None):
            raise BadRecord("bad_segment", f"{where}: segment {str(s)[:80]!r} needs 'text' or 'image'")
    return Record(where, kind, segs)


def _read_jsonl(part: Part, kind: SourceKind) -> Iterator[Record]:
    base = Path(part.path).parent
    i = 0
    with open(part.path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            if part.start <= i < part.stop:
                where = f"{part.path}:{i + 1}"
                yield _guarded(where, kind, lambda: _jsonl_record(line, base, kind, where))
            i += 1
            if i >= part.stop:
                return


def _caption_from(files: dict[str, bytes], where: str, fallback: str | None) -> tuple[str, str]:
    """(caption, repair) from a sample's `.txt` or `.json` bytes; BadRecord `no_caption` when neither exists."""
    if ".txt" in files:
        cap, fix = decode_caption(files[".txt"], f"{where}.txt", fallback)
        if not cap.strip():
            raise BadRecord("empty_caption", f"{where}.txt is empty")
        return cap.strip(), fix
    if ".json" in files:
        return _caption_of(_parse_json(files[".json"], f"{where}.json"), f"{where}.json"), ""
    raise BadRecord("no_caption", f"{where}: no caption file ({where}.txt or .json with 'caption')")


def _pair(key: str, stem: str, files: dict[str, bytes], img: bytes | None, fallback: str | None) -> Record:
    """A pair record from an image and its caption files (named `stem`.txt / `stem`.json in messages)."""
    cap, fix = _caption_from(files, stem, fallback)
    return Record(key, "pairs", [("text", cap), ("image", img)], repaired=fix)


def _read_folder(part: Part, fallback: str | None) -> Iterator[Record]:
    for p in _folder_images(part.path)[part.start : part.stop]:
        img = Path(p)
        side = {ext: b for ext in (".txt", ".json") if (b := _read_bytes(img.with_suffix(ext))) is not None}
        yield _guarded(p, "pairs", lambda: _pair(p, str(img.with_suffix("")), side, _read_bytes(img), fallback))


def _read_tar(part: Part, fallback: str | None) -> Iterator[Record]:
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
        g, where = groups[key], f"{part.path}:{key}"
        img = next((g[e] for e in IMAGE_EXTS if e in g), None)
        if img is None:
            yield Record(where, "pairs", [], skipped="no_image", detail=f"{where}: members {sorted(g)} hold no image")
            continue
        yield _guarded(where, "pairs", lambda: _pair(where, where, g, img, fallback))


def read_part(part: Part, kind: SourceKind, caption_fallback: str | None = None) -> Iterator[Record]:
    """Records of one part, in order; malformed ones come as `Record.skipped` (see the module doc).

    `caption_fallback`: encoding used to repair a non-UTF-8 caption file (tar/folder), else it is skipped.
    """
    if part.path.endswith(".tar"):
        return _read_tar(part, caption_fallback)
    if os.path.isdir(part.path):
        return _read_folder(part, caption_fallback)
    return _read_jsonl(part, kind)


def _text_of(line: bytes, where: str) -> str:
    rec = _parse_json(line, where)
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise BadRecord("no_text", f"{where}: expected a JSON object with a string 'text' field")
    return rec["text"]


def _txt_doc(fp: str) -> str:
    try:
        return Path(fp).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("not_utf8", f"{fp}: {e}") from e


def _text_items(fp: str) -> Iterator[tuple[str, object]]:
    """(where, thunk giving the text or raising BadRecord) for each document of one file."""
    if not fp.endswith(".jsonl"):
        yield fp, lambda: _txt_doc(fp)
        return
    with open(fp, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{fp}:{n}", lambda line=line, n=n: _text_of(line, f"{fp}:{n}")


def text_files(inputs: list[str]) -> list[str]:
    """The text files of `inputs` in reading order (globs expanded, folders searched for .txt/.jsonl)."""
    out: list[str] = []
    for path in expand(inputs):
        out += sorted(str(p) for p in Path(path).rglob("*") if p.suffix in (".txt", ".jsonl")) if os.path.isdir(path) else [path]
    return out


def iter_texts(inputs: list[str], skips: SkipLog | None = None, strict: bool = False) -> Iterator[str]:
    """Text documents: the 'text' field of each .jsonl line, or one whole .txt file per document.

    A bad line (`bad_json`, `not_utf8`, `no_text`) or a .txt file that is not UTF-8 is skipped and
    recorded in `skips`; with `strict` (or no `skips`) it raises ValueError naming file and line.
    """
    for fp in text_files(inputs):
        for where, get in _text_items(fp):
            try:
                text = get()
            except BadRecord as e:
                if strict or skips is None:
                    raise ValueError(f"{e.detail} ({e.reason}); fix or remove it") from e
                skips.add(where, e.reason, e.detail)
                continue
            yield text
