"""Special-token ids and the vocabulary size, recorded in `<tokenizer>.json` beside a sentencepiece model.

`data_pipeline.tokenizer` writes the file (it derives the ids from the sentencepiece model); the
loader, the trainer's config (`model.vocab_size`), export and generation read it from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class SpecialIds:
    """Vocabulary size (sentencepiece pieces + appended BOI/EOI/PAD) and the special ids the pipeline and model use."""

    vocab_size: int
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int
    pad_id: int


def meta_path(model_path: str | Path) -> Path:
    """Where the special-id metadata of tokenizer `model_path` lives: `<model>.json` beside it."""
    return Path(model_path).with_suffix(".json")


def save_special_ids(ids: SpecialIds, model_path: str | Path) -> Path:
    """Write `ids` to `<model>.json` beside `model_path`; returns that path."""
    path = meta_path(model_path)
    path.write_text(json.dumps(asdict(ids), indent=2) + "\n")
    return path


def load_special_ids(path: str | Path) -> SpecialIds:
    """Special ids of a tokenizer (path to its .model or to its .json metadata).

    Raises FileNotFoundError (metadata missing: says how to write it) or ValueError (a field missing).
    """
    p = Path(path)
    meta = p if p.suffix == ".json" else meta_path(p)
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta}: tokenizer metadata missing; run `python -m data_pipeline.tokenizer wrap --model {p}` "
            "to record the special ids next to the model"
        )
    d = json.loads(meta.read_text())
    try:
        return SpecialIds(**{f.name: int(d[f.name]) for f in fields(SpecialIds)})
    except KeyError as e:
        raise ValueError(f"{meta}: field {e} missing; re-run `python -m data_pipeline.tokenizer wrap`") from e
