"""One image preparation path: bytes -> safe decode -> model pixels + quality features.

``keeper embed`` (a Ray Data task) and the Serve ingress both prepare images here, so a series
scored over HTTP gets exactly the features its ranker was trained on: the same decode limits,
the same JPEG draft bound, the same resize/crop, the same quality features, and the original
(displayed) width and height rather than the draft-decoded ones.

Blockiness of a drafted JPEG. A draft decode downscales by 1/2..1/8 in the DCT domain, which
erases the 8x8 block grid the blockiness feature looks for: measured on those pixels a
quality-10 12 MP photo reads ~1.02, as clean as a quality-95 one. A full decode just to measure
it would give back the draft's speed, so ``decode`` also decodes a band of the original at full
resolution (``keeper_core.images.decode_jpeg_band``): the top 64 stored rows at full width (8
rows of blocks; more on photos under 1024 wide), where the grid is measured as on an undrafted
image's central crop. benchmarks/blockiness.py: decode + blockiness at 0.90-0.95x the draft's
images/s (a full decode: 0.43-0.81x), and quality 10 reads 3.0-5.5 against 1.01-1.02 at 95.

Not from the quantisation tables: that header-only estimate of the JPEG quality is free, but a
crushed JPEG re-saved at high quality (blocks baked into the pixels, fine tables) reads as
clean, and a camera's own tables only roughly map to a quality. What the band misses: blocking
confined to the rest of the frame, and a flat top (a clipped sky) reads ~1 whatever the
quality, as a flat centre does for an undrafted image. For one photo, drafted and undrafted
values differ by the content of the two regions, not systematically. Images that were not
drafted (every non-JPEG, a JPEG under twice the draft size) are measured on their decoded
pixels as before, and so is a drafted JPEG whose band does not decode (its header defeats the
band's walk, though libjpeg decoded it): on the draft, which reads as clean, never by a second,
full-resolution decode that the pixel limits of a request would not count.

A camera RAW file is prepared from its embedded JPEG preview: width/height are its displayed size.
An image with transparency keeps its alpha beside the pixels composited on white
(``DecodedImage.alpha``, from the same decode): the model sees it on white, the quality features
measure it where it is opaque (``keeper_core.quality``).

    prep = ImagePreparation("ViT-B-32:laion2b_s34b_b79k")
    decoded = [prep.decode(data, source=uri) for data in blobs]   # ImageDecodeError per image
    pixels = np.stack([prep.resize(d) for d in decoded])          # (N, 3, S, S) uint8
    feats = prep.quality(decoded)                                 # (N, len(FEATURE_NAMES))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from keeper_core.decoders import Decoder, PilDecoder
from keeper_core.errors import ImageDecodeError
from keeper_core.images import (
    DecodeLimits,
    RawPreview,
    decode_jpeg_band,
    image_size,
    raw_preview,
)
from keeper_core.models import PreprocessConfig, preprocess_config, resize_transform
from keeper_core.quality import (
    BLOCK_CROP,
    FEATURE_NAMES,
    block_grid_ratio,
    quality_features,
)

#: The quality features' working size. Drafting below it would blur what they measure.
QUALITY_SIZE = 256

_WIDTH, _HEIGHT = FEATURE_NAMES.index("width"), FEATURE_NAMES.index("height")
#: Full-resolution pixels a drafted JPEG's blockiness is measured on: with the band's floor of
#: 64 rows, the full width of a photo >= 1024 wide, and >= 1,024 blocks on a narrower one.
BAND_PIXELS = BLOCK_CROP * BLOCK_CROP // 4


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and what must be measured on the original, not the draft.

    Attributes:
        image: RGB pixels; a JPEG much larger than needed is draft-decoded (downscaled).
        width, height: the original displayed size (EXIF-oriented), before any draft.
        blockiness: for a drafted JPEG, blockiness measured on full-resolution pixels (the
            draft has lost the block grid); None when ``image`` is at full resolution, and for
            a drafted JPEG whose band does not decode (then measured on the draft).
        alpha: the alpha composited into ``image`` (mode "L", its size), for an image with
            transparency: the quality features measure exposure where it is opaque. None for
            every other image (every JPEG).
    """

    image: Image.Image
    width: int
    height: int
    blockiness: float | None = None
    alpha: Image.Image | None = None


class ImagePreparation:
    """Decode, resize and measure images for one CLIP model, identically everywhere.

    Args:
        spec: the ModelSpec whose input size and resize/crop the pixels get.
        limits: byte, pixel and minimum-side limits enforced before any pixel is decoded.
        draft: decode JPEGs larger than twice ``max(model size, QUALITY_SIZE)`` downscaled in
            the DCT domain (2-5x faster on 12 MP photos).
        decoder: the decode backend (``keeper_core.decoders``; default PIL, the reference).
        preprocess: ``preprocess_config(spec)``, when the caller has it: without it, it is read
            from open_clip's configs, which imports open_clip and torch. A CPU decode worker is
            given it and imports neither (keeper embed's decode tasks).
    """

    def __init__(
        self,
        spec: str,
        *,
        limits: DecodeLimits | None = None,
        draft: bool = True,
        decoder: Decoder | None = None,
        preprocess: PreprocessConfig | None = None,
    ):
        self.spec = spec
        self.decoder: Decoder = decoder or PilDecoder()
        self.limits = limits or DecodeLimits()
        self.preprocess = preprocess or preprocess_config(spec)
        self.image_size = self.preprocess.image_size
        side = max(self.image_size, QUALITY_SIZE)
        self.draft_size: tuple[int, int] | None = (side, side) if draft else None
        self._resize: Any = resize_transform(self.preprocess)

    def decode(self, data: bytes, *, source: str | None = None) -> DecodedImage:
        """Decode one image safely; a drafted JPEG's blockiness is measured at full resolution.

        A camera RAW file is decoded as its embedded preview (a JPEG: drafted and banded).

        Raises:
            ImageDecodeError: with its reason (see ``keeper_core.images.decode_image``).
        """
        # A RAW's preview is extracted once, and the three calls below read the same JPEG.
        src: bytes | RawPreview = raw_preview(data, limits=self.limits, source=source) or data
        img, alpha = self.decoder.decode_alpha(
            src, limits=self.limits, source=source, draft_size=self.draft_size
        )
        if self.draft_size is None:
            return DecodedImage(image=img, width=img.width, height=img.height, alpha=alpha)
        width, height = image_size(src)
        drafted = img.size != (width, height)
        blockiness = self.full_resolution_blockiness(src, source) if drafted else None
        return DecodedImage(
            image=img, width=width, height=height, blockiness=blockiness, alpha=alpha
        )

    def full_resolution_blockiness(
        self, src: bytes | RawPreview, source: str | None
    ) -> float | None:
        """Blockiness of a drafted JPEG, measured on a full-resolution band of the original.

        None when no band decodes (a header the band's walk cannot follow, though the draft
        decode could): the image is then measured on its drafted pixels, as given, which have
        lost the grid and read as clean. Never a full-resolution decode instead: a caller counts
        the pixels a decode allocates from the header (the draft's size, for a drafted JPEG), so
        an uncounted decode 64 times that size is what a crafted header would buy.
        """
        jpeg = src.data if isinstance(src, RawPreview) else src
        try:
            band = decode_jpeg_band(jpeg, pixels=BAND_PIXELS, source=source)
        except ImageDecodeError:
            return None
        return block_grid_ratio(np.asarray(band))

    def resize(self, decoded: DecodedImage) -> np.ndarray:
        """The model's input for one image: ``(3, S, S)`` uint8 (normalised on the device)."""
        out: np.ndarray = self._resize(decoded.image)
        return out

    def pixels(self, decoded: Sequence[DecodedImage]) -> np.ndarray:
        """``(N, 3, S, S)`` uint8 for a batch (an empty batch keeps its shape)."""
        if not decoded:
            s = self.image_size
            return np.zeros((0, 3, s, s), np.uint8)
        return np.stack([self.resize(d) for d in decoded])

    def quality(self, decoded: Sequence[DecodedImage]) -> np.ndarray:
        """Quality features ``(N, len(FEATURE_NAMES))`` float32.

        Width, height and (for drafted JPEGs) blockiness are the original's, from ``decode``;
        an image with transparency is measured where it is opaque (``keeper_core.quality``).
        """
        feats = quality_features(
            [d.image for d in decoded],
            size=QUALITY_SIZE,
            blockiness=[d.blockiness for d in decoded],
            alpha=[d.alpha for d in decoded],
        ).astype(np.float32)
        if len(decoded):
            feats[:, _WIDTH] = [d.width for d in decoded]
            feats[:, _HEIGHT] = [d.height for d in decoded]
        return feats
