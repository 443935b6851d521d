"""How many sequence positions an image takes: one home for the rule the packer, loader, model and planner share.

An image of a (C, H, W) latent cut into p x p patches is P = (H/p) * (W/p) positions in raster order.
In a packed row it sits between BOI and EOI; a caption-image pair is a document of its own:
BOS, the caption, BOI, P patches, EOI, EOS (caption first or image first, the count is the same).
Imports nothing, so the data pipeline's workers stay light.
"""

from __future__ import annotations

#: positions an image adds beyond its patches: BOI + EOI
IMAGE_MARKERS = 2
#: positions a caption-image pair adds beyond its patches and caption tokens: BOS, BOI, EOI, EOS
PAIR_MARKERS = 4


def patches_per_image(height: int, width: int, patch_size: int) -> int:
    """P = (height / patch_size) * (width / patch_size) patches of a latent of height x width.

    Raises ValueError when a side is not divisible by patch_size (the patches would not tile it).
    """
    if patch_size <= 0 or height % patch_size or width % patch_size:
        raise ValueError(f"a {height}x{width} latent is not divisible into {patch_size}x{patch_size} patches")
    return (height // patch_size) * (width // patch_size)


def image_positions(patches: int) -> int:
    """Positions of one image in a row: BOI + P patches + EOI."""
    return patches + IMAGE_MARKERS


def pair_positions(patches: int, caption_tokens: int = 0) -> int:
    """Positions of a caption-image pair document: BOS + caption + BOI + P patches + EOI + EOS = caption + P + 4."""
    return caption_tokens + patches + PAIR_MARKERS
