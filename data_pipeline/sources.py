"""Readers for the raw inputs users have: text (jsonl / txt), image-caption pairs (jsonl, a folder of
images with caption side files, webdataset tars as img2dataset writes, parquet with an image column
and a caption column as LAION / Hugging Face datasets write) and interleaved documents (jsonl, or
OBELICS-style parquet with parallel `texts` / `images` lists).

Image sources are split into deterministic *parts* (a jsonl line range, a folder file range, a parquet
row range, one tar; a remote tar or parquet file is one part) so that precompute can spread them over
ranks and resume part by part. Text sources are split into byte ranges (`text_pieces`) for pack.
Inputs may be globs, brace ranges (`shards/{00000..00099}.tar`) and remote URLs (`s3://...`, read
streamed through `data_pipeline.storage`).

A malformed record never stops a reader: it is yielded as a `Record` with `skipped` set to a short
reason (`bad_json`, `not_utf8`, `no_image_field`, `no_caption`, `empty_caption`, `caption_not_utf8`,
`bad_segment`, `no_image`, `bad_row`) and `detail`, which precompute counts and names in its report.
A caption that is not UTF-8 is repaired instead when `caption_fallback` names an encoding
(e.g. "cp1252"); the record's `repaired` says so.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from data_pipeline import storage

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
        return {counts_key: dict(sorted(self.counts.items())), "named": self.named,
                "named_left_out": self.named_left_out}

    def summary(self, what: str) -> str:
        """One log line: `<what>: skipped N (reason n, ...); first: <record> (<reason>)`; "" when nothing was
        skipped."""
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


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion, in order: `a{00000..00002}.tar` -> a00000.tar, a00001.tar, a00002.tar
    (the width of zero-padded bounds is kept), `x.{tar,parquet}` -> x.tar, x.parquet; nested and
    several groups expand left to right; `{5..3}` counts down; a group with neither stays literal."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.groups()
        width = len(a) if a.lstrip("-").startswith("0") and len(a) > 1 else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]  # a literal {x}
    return [x for it in items for x in expand_braces(head + it + tail)]


def expand(inputs: list[str]) -> list[str]:
    """Expand brace ranges and globs; each local input must match something (error names it).

    Remote URLs (`s3://...`) are brace-expanded but not listed or checked here: a missing object is a
    StorageError naming its URL when it is read.
    """
    out: list[str] = []
    for given in inputs:
        for pat in expand_braces(given):
            if storage.is_remote(pat):
                out.append(pat)
                continue
            hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if os.path.exists(pat) else [])
            if not hits:
                raise FileNotFoundError(f"{pat}: no such input file or directory"
                                        + (f" (from {given})" if pat != given else ""))
            out += hits
    return out


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _folder_images(path: str) -> list[str]:
    return sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def list_parts(inputs: list[str], part_size: int = 1000) -> list[Part]:
    """All parts of the given inputs, in a fixed order (independent of the number of ranks).

    A local parquet file is cut into row ranges of `part_size` (its row count comes from the footer); a
    tar, and any remote file, is one part (read streamed, once).
    """
    parts: list[Part] = []
    for path in expand(inputs):
        if storage.is_remote(path) and not path.endswith((".tar", ".parquet")):
            raise ValueError(f"{path}: a remote image input must be a webdataset .tar or a .parquet file; "
                             "copy jsonl inputs and their images to a local filesystem")
        if path.endswith(".tar") or storage.is_remote(path):
            parts.append(Part(path, 0, -1))
            continue
        if path.endswith(".parquet"):
            n = _parquet_rows(path)
            parts += [Part(path, s, min(s + part_size, n)) for s in range(0, n, part_size)]
            continue
        n = len(_folder_images(path)) if os.path.isdir(path) else _count_lines(path)
        parts += [Part(path, s, min(s + part_size, n)) for s in range(0, n, part_size)]
    return parts


def file_stamp(path: str | Path) -> list:
    """[resolved path, size in bytes, mtime in ns] of a file: cheap evidence that it is unchanged ([URL] for a
    remote object: the URL names it, as in part_fingerprint)."""
    if storage.is_remote(path):
        return [str(path)]
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def part_fingerprint(part: Part) -> str:
    """sha256 identifying what a part reads: its jsonl lines' bytes, its folder files' stamps, or its tar's stamp.

    A jsonl part hashes its own lines, so lines appended to the file leave earlier parts valid.
    """
    if storage.is_remote(part.path):  # the URL names the object (a replaced object keeps it: use a new --out)
        return hashlib.sha256(json.dumps([part.path, part.start, part.stop]).encode()).hexdigest()
    h = hashlib.sha256(json.dumps([str(Path(part.path).resolve()), part.start, part.stop]).encode())
    if part.path.endswith((".tar", ".parquet")):
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
    raise BadRecord("no_caption",
                    f"{where}: no string caption field (one of {CAPTION_KEYS}); got keys {sorted(rec)[:8]}")


def decode_caption(raw: bytes, where: str, fallback: str | None) -> tuple[str, str]:
    """UTF-8 text of caption bytes -> (text, repair made or ""); BadRecord `caption_not_utf8` without a fallback."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        if fallback:
            return raw.decode(fallback, "replace"), f"caption_{fallback}"
        raise BadRecord("caption_not_utf8",
                        f"{where}: {e}; set --caption-fallback-encoding (e.g. cp1252) to repair") from e


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
        with storage.open_read(part.path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
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


@dataclass(frozen=True)
class Columns:
    """Column names of parquet inputs (the CLI's --image-column & co.): pairs read `image` + `caption`,
    interleaved rows read the parallel lists `texts` + `images`."""

    image: str = "image"
    caption: str = "caption"
    texts: str = "texts"
    images: str = "images"


def _parquet_file(path: str) -> Any:
    """A pyarrow ParquetFile of a local path, or of a remote object read whole into memory (parquet needs
    its footer first, so a remote file is fetched as one streamed read, never to local disk)."""
    import pyarrow as pa  # noqa: PLC0415 - only parquet inputs need it
    import pyarrow.parquet as pq  # noqa: PLC0415

    try:
        src = pa.BufferReader(storage.read_bytes(path)) if storage.is_remote(path) else path
        return pq.ParquetFile(src)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e}); re-download or drop this file") from e


def _parquet_rows(path: str) -> int:
    return _parquet_file(path).metadata.num_rows


def _need_columns(pf: Any, path: str, want: dict[str, str]) -> None:
    have = set(pf.schema_arrow.names)
    for flag, col in want.items():
        if col not in have:
            raise ValueError(f"{path}: no column '{col}' (columns: {sorted(have)[:20]}); "
                             f"name the right one with {flag}")


def _parquet_rows_of(part: Part, cols: list[str]) -> Iterator[tuple[int, dict]]:
    """(row number in the file, {column: python value}) for the rows [start, stop) of a parquet part,
    reading only the row groups that overlap it."""
    pf = _parquet_file(part.path)
    stop = pf.metadata.num_rows if part.stop < 0 else part.stop
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n > part.start and first < stop:
            table = pf.read_row_group(g, columns=cols)
            lo, hi = max(part.start - first, 0), min(stop - first, n)
            for i, row in enumerate(table.slice(lo, hi - lo).to_pylist()):
                yield first + lo + i, row
        first += n
        if first >= stop:
            return


def _image_value(v: object, base: str, where: str) -> bytes | None:
    """Image bytes from a parquet cell: bytes, a Hugging Face `{"bytes", "path"}` struct, or a local/remote path
    (relative paths are relative to the parquet file's folder). None when a path cannot be read (counted as
    `missing_file`); BadRecord `no_image` for a null cell or an empty struct, `bad_row` for another type."""
    if isinstance(v, dict):
        if v.get("bytes"):
            return v["bytes"]
        v = v.get("path")
        if not v:
            raise BadRecord("no_image", f"{where}: image struct holds neither bytes nor path")
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if v is None:
        raise BadRecord("no_image", f"{where}: the image cell is null")
    if not isinstance(v, str):
        raise BadRecord("bad_row", f"{where}: image cell of type {type(v).__name__}; want bytes, a path or a struct")
    url = v if storage.is_remote(v) or os.path.isabs(v) else storage.join(storage.parent(base), v)
    try:
        return storage.read_bytes(url)
    except Exception:  # noqa: BLE001 - any unreadable path or URL is a missing image, counted as `missing_file`
        return None


def _parquet_pair(row: dict, cols: Columns, path: str, where: str) -> Record:
    cap = row.get(cols.caption)
    if cap is None:
        raise BadRecord("no_caption", f"{where}: column '{cols.caption}' is null")
    if not isinstance(cap, str):
        raise BadRecord("bad_row", f"{where}: column '{cols.caption}' holds {type(cap).__name__}, not a string")
    if not cap.strip():
        raise BadRecord("empty_caption", f"{where}: column '{cols.caption}' is empty")
    return Record(where, "pairs", [("text", cap), ("image", _image_value(row.get(cols.image), path, where))])


def _parquet_interleaved(row: dict, cols: Columns, path: str, where: str) -> Record:
    texts, imgs = row.get(cols.texts), row.get(cols.images)
    if not isinstance(texts, list) or not isinstance(imgs, list) or len(texts) != len(imgs):
        lens = [len(x) if isinstance(x, list) else type(x).__name__ for x in (texts, imgs)]
        raise BadRecord("bad_row",
                        f"{where}: '{cols.texts}' and '{cols.images}' must be lists of one length (got {lens})")
    segs: list[tuple[str, object]] = []
    for j, (t, im) in enumerate(zip(texts, imgs)):
        if t is not None and im is not None:
            raise BadRecord("bad_segment", f"{where}: position {j} holds both a text and an image")
        if t is not None:
            if not isinstance(t, str):
                raise BadRecord("bad_segment", f"{where}: text at position {j} is {type(t).__name__}")
            segs.append(("text", t))
        elif im is not None:
            segs.append(("image", _image_value(im, path, f"{where}[{j}]")))
    if not segs:
        raise BadRecord("bad_row", f"{where}: every position is null")
    return Record(where, "interleaved", segs)


def _read_parquet(part: Part, kind: SourceKind, cols: Columns) -> Iterator[Record]:
    """Rows of a parquet part as records (pairs: image + caption columns; interleaved: texts + images lists)."""
    want = ({"--image-column": cols.image, "--caption-column": cols.caption} if kind == "pairs" else
            {"--texts-column": cols.texts, "--images-column": cols.images})
    _need_columns(_parquet_file(part.path), part.path, want)
    make = _parquet_pair if kind == "pairs" else _parquet_interleaved
    for i, row in _parquet_rows_of(part, list(want.values())):
        where = f"{part.path}:row {i}"
        yield _guarded(where, kind, lambda: make(row, cols, part.path, where))


def read_part(part: Part, kind: SourceKind, caption_fallback: str | None = None,
              columns: Columns | None = None) -> Iterator[Record]:
    """Records of one part, in order; malformed ones come as `Record.skipped` (see the module doc).

    `caption_fallback`: encoding used to repair a non-UTF-8 caption file (tar/folder), else it is skipped.
    `columns`: parquet column names (default `Columns()`). A parquet file that lacks a named column is a
    ValueError naming the file, the column and the flag to set.
    """
    if part.path.endswith(".tar"):
        return _read_tar(part, caption_fallback)
    if part.path.endswith(".parquet"):
        return _read_parquet(part, kind, columns or Columns())
    if os.path.isdir(part.path):
        return _read_folder(part, caption_fallback)
    return _read_jsonl(part, kind)


def _text_of(line: bytes, where: str) -> str:
    rec = _parse_json(line, where)
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise BadRecord("no_text", f"{where}: expected a JSON object with a string 'text' field")
    return rec["text"]


def _text_items(fp: str) -> Iterator[tuple[str, object]]:
    """(where, thunk giving the text or raising BadRecord) for each document of one file."""
    if not fp.endswith(".jsonl"):
        yield fp, lambda: _txt_bytes(storage.read_bytes(fp), fp)
        return
    with storage.open_read(fp) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{fp}:{n}", lambda line=line, n=n: _text_of(line, f"{fp}:{n}")


def text_files(inputs: list[str]) -> list[str]:
    """The text files of `inputs` in reading order (globs expanded, folders searched for .txt/.jsonl)."""
    out: list[str] = []
    for path in expand(inputs):
        if storage.is_remote(path) and not path.endswith((".txt", ".jsonl")):
            raise ValueError(f"{path}: a remote text input must be a .jsonl or .txt file (list them, or a brace range)")
        out += (sorted(str(p) for p in Path(path).rglob("*") if p.suffix in (".txt", ".jsonl"))
                if os.path.isdir(path) else [path])
    return out


def text_pieces(inputs: list[str], piece_bytes: int) -> list[Part]:
    """The text inputs cut into byte ranges of at most `piece_bytes` (a .txt file, a remote file: whole, stop=-1).

    A jsonl line belongs to the piece holding its first byte, so pieces are cut from file sizes alone
    (nothing is read) and every line is in exactly one piece, whatever the number of ranks.
    """
    out: list[Part] = []
    for fp in text_files(inputs):
        if storage.is_remote(fp) or not fp.endswith(".jsonl"):
            out.append(Part(fp, 0, -1))
            continue
        n = os.path.getsize(fp)
        out += [Part(fp, s, min(s + piece_bytes, n)) for s in range(0, n, piece_bytes)]
    return out


def piece_bytes(part: Part) -> int:
    """Bytes of input a text piece covers (a whole local file's size; 0 when unknown: remote)."""
    if part.stop >= 0:
        return part.stop - part.start
    return 0 if storage.is_remote(part.path) else os.path.getsize(part.path)


def _jsonl_lines(part: Part) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each line starting in [start, stop) of a jsonl file (stop=-1: to the end)."""
    with storage.open_read(part.path) as f:
        pos = part.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # a line begun in the previous piece: it belongs there
                pos += len(f.readline())
        while part.stop < 0 or pos < part.stop:
            line = f.readline()
            if not line:
                return
            yield pos, line
            pos += len(line)


def read_text_piece(part: Part, skips: SkipLog | None = None, strict: bool = False) -> Iterator[str]:
    """Text documents of one piece (see text_pieces): the 'text' of each jsonl line, or a whole .txt file.

    Records are named `FILE@OFFSET` (the byte offset of the line: `tail -c +$((OFFSET+1)) FILE | head -1`
    prints it). Bad records as for iter_texts.
    """
    if part.path.endswith(".jsonl"):
        items = ((f"{part.path}@{pos}", lambda line=line, pos=pos: _text_of(line, f"{part.path}@{pos}"))
                 for pos, line in _jsonl_lines(part) if line.strip())
    else:
        items = iter([(part.path, lambda: _txt_bytes(storage.read_bytes(part.path), part.path))])
    yield from _skipping_bad(items, skips, strict)


def _skipping_bad(items: Iterator[tuple[str, Any]], skips: SkipLog | None, strict: bool) -> Iterator[str]:
    """The texts of (where, get) items; a `get()` raising BadRecord is recorded in `skips` and skipped, or with
    `strict` (or no `skips`) raises ValueError naming the record and what to do."""
    for where, get in items:
        try:
            text = get()
        except BadRecord as e:
            if strict or skips is None:
                raise ValueError(f"{e.detail} ({e.reason}); fix or remove it") from e
            skips.add(where, e.reason, e.detail)
            continue
        yield text


def _txt_bytes(raw: bytes, fp: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("not_utf8", f"{fp}: {e}") from e


def iter_texts(inputs: list[str], skips: SkipLog | None = None, strict: bool = False) -> Iterator[str]:
    """Text documents: the 'text' field of each .jsonl line, or one whole .txt file per document.

    A bad line (`bad_json`, `not_utf8`, `no_text`) or a .txt file that is not UTF-8 is skipped and
    recorded in `skips`; with `strict` (or no `skips`) it raises ValueError naming file and line.
    """
    for fp in text_files(inputs):
        yield from _skipping_bad(_text_items(fp), skips, strict)
