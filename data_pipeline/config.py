"""Typed config of the data section: where shards live, how sources mix, per-step randomness."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamConfig:
    """One source of packed MDS shards (text, image-caption or interleaved)."""

    name: str = "text"
    remote: str | None = None  # s3://, gs://, or a local directory used as a remote
    local: str = ""  # local directory with shards (ignored when remote is set: data.cache_dir holds the cache)
    proportion: float | None = None  # share of sequences drawn from this stream


@dataclass
class DataConfig:
    """The data section of a run config."""

    tokenizer: str = ""  # path to the sentencepiece .model (special ids sit next to it); sets model.vocab_size
    vae: str = ""  # diffusers AutoencoderKL dir that encoded the latents: decodes samples, shipped by export
    seq_len: int = 4096  # positions per packed training sequence
    streams: list[StreamConfig] = field(default_factory=list)
    val_streams: list[StreamConfig] = field(default_factory=list)
    cache_dir: str = ""  # local cache root for remote streams; one subdirectory per (remote, index.json, pack.json)
    # e.g. "50gb": streaming evicts shards past it and re-downloads them; None = keep all
    cache_limit: str | None = None
    num_workers: int = 2
    prefetch_factor: int = 2
    shuffle: bool = True
    num_canonical_nodes: int = 1  # fixed so mid-epoch resumption holds across world sizes
    caption_first_prob: float = 0.8  # share of image-caption pairs laid out caption first
    image_first_max_timestep: int = 500  # noise cap for image-first pairs (captioning)
    caption_dropout: float = 0.1  # drop the caption for classifier-free guidance
    # When no stream sets `proportion`: choose proportions so this share of all positions are image
    # patches (the paper's 1:1 text:image positions), from each stream's pack.json; None = by size.
    image_position_share: float | None = 0.5

    def __post_init__(self) -> None:
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len must be positive, got {self.seq_len}")
        for name in ("caption_first_prob", "caption_dropout", "image_position_share"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"data.{name} must lie in [0, 1], got {v}")
        if self.image_first_max_timestep < 0:
            raise ValueError(f"data.image_first_max_timestep must be >= 0, got {self.image_first_max_timestep}")
        if self.cache_limit is not None:
            from streaming.base.util import bytes_to_int  # noqa: PLC0415

            try:
                if bytes_to_int(self.cache_limit) <= 0:
                    raise ValueError("not positive")
            except ValueError as e:
                raise ValueError(f"data.cache_limit={self.cache_limit!r}: not a size ({e}); write it as e.g. \"50gb\" "
                                 "or \"512mb\", or null to keep every shard") from e
        props = [s.proportion for s in self.streams]
        if any(p is None for p in props) and any(p is not None for p in props):
            raise ValueError("data.streams: set `proportion` on every stream or on none")
        if any(p is not None and p <= 0 for p in props):
            raise ValueError(f"data.streams: proportions must be positive, got {props}")
