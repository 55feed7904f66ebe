"""Handcrafted image quality features, computed vectorised over a batch.

These are the cheap, interpretable signals a series-ranking head can use beside a CLIP
embedding: is the shot sharp, well exposed, clean, colourful, free of JPEG blocking?

Every image is resized to one fixed ``size x size`` square first, because sharpness and noise
are resolution dependent: only at a common scale are they comparable across the shots of a
series. The batch is then stacked to ``(N, size, size)`` so the maths is plain numpy over the
whole batch. Blockiness is the exception: resizing destroys the 8x8 JPEG grid, so it is
measured per image on (a central crop of) the pixels as given. That is only meaningful at full
resolution: a JPEG draft-decoded at 1/2..1/8 has lost its grid (a quality-10 photo reads as
clean), so a caller that drafted passes ``blockiness`` measured on full-resolution pixels
(``keeper_core.preparation`` decodes a top band of the original for it).

Transparency. Keeper composites alpha on white (what CLIP sees and a viewer shows), but a cut-out's
transparent area was never light the camera caught: counted with the rest, a mid-grey product shot
on a 60 % transparent background reads 60 % blown highlights and brightness 0.80 (its subject:
0.50). So where an image has transparency, the features that read levels (brightness, clip_dark,
clip_bright, contrast, colorfulness) are measured over its opaque pixels (alpha >= ``OPAQUE`` after
the same resize), and noise over the pixels whose 3x3 neighbourhood is opaque: over the flat
backdrop the median residual is 0 whatever the subject's noise, and the cut edge is no noise.
Sharpness stays on the composited frame: the Laplacian's variance is the edge energy of the image
as shown, the subject's outline against white is an edge the image has either way, and a variance
(unlike a median) is only scaled down by a flat backdrop, alike for every shot of a series.
Blockiness measures the pixels as given, as before. An image whose every pixel is opaque is
measured exactly as one without alpha; one with no opaque pixel (a blank) is measured whole, as
composited (white: brightness 1, clip_bright 1), as is noise where no 3x3 neighbourhood is opaque.

    >>> feats = quality_features([img_a, img_b])  # (2, len(FEATURE_NAMES)) float32
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from keeper_core.errors import DataError
from keeper_core.images import split_alpha

FEATURE_NAMES: tuple[str, ...] = (
    "sharpness",  # log(1 + var(Laplacian)) of grey on the 0..255 scale
    "brightness",  # mean luminance in [0, 1]
    "clip_dark",  # fraction of pixels with luminance <= 2/255
    "clip_bright",  # fraction of pixels with luminance >= 253/255
    "contrast",  # RMS contrast: std of luminance in [0, 1]
    "noise",  # robust noise sigma of luminance in [0, 1] units
    "colorfulness",  # Hasler & Suesstrunk (2003) on RGB in [0, 1]
    "blockiness",  # 8x8 boundary / interior gradient ratio; ~1 means no blocking
    "width",  # original width in pixels
    "height",  # original height in pixels
)

# Rec. 601 luma weights: the same ones PIL's convert("L") uses, so numbers match PIL greys.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Images per vectorised chunk: bounds peak memory (~64 x 256 x 256 x 4 B per temporary)
# when a caller hands over a Ray Data batch of thousands.
_CHUNK = 64
#: Central crop for blockiness: enough 8x8 blocks for a stable ratio, cheap on 12 MP photos.
BLOCK_CROP = 512
# Immerkaer's noise mask: its response to smooth (planar) image content is zero, and to white
# noise of std sigma it is white noise of std 6 * sigma (sqrt of the sum of squared taps = 36).
_IMMERKAER = ((1, -2, 1), (-2, 4, -2), (1, -2, 1))
# Median of |N(0, 1)| is 0.6745: scales a median absolute value to a std.
_MAD_TO_STD = 1.4826
#: Alpha (0..255) from which a pixel counts as opaque: half way, so a cut-out's antialiased
#: edge counts with whichever of subject and backdrop it mostly shows.
OPAQUE = 128


def quality_features(
    images: Sequence[Image.Image],
    *,
    size: int = 256,
    blockiness: Sequence[float | None] | None = None,
    alpha: Sequence[Image.Image | None] | None = None,
) -> np.ndarray:
    """Compute the handcrafted quality features of a batch of images.

    Args:
        images: PIL images of any mode (converted to RGB as ``decode_image`` converts:
            alpha composited on white, 16-bit and float greys scaled) and any size. An image
            with transparency (RGBA, LA, a palette's transparent index) is measured where it
            is opaque (see the module docstring).
        size: side of the square every image is resized to before the resolution dependent
            features (everything except blockiness, width and height) are computed.
        blockiness: per image, blockiness already measured on full-resolution pixels (see
            ``block_grid_ratio``), for images that are downscaled decodes; None entries, or
            no sequence, are measured here on the pixels given.
        alpha: per image, the alpha composited into it (mode "L", the image's size: what
            ``images.decode_image_alpha`` returns beside an RGB image); None entries, or no
            sequence, take the image's own transparency, if any.

    Returns:
        A float32 array of shape ``(len(images), len(FEATURE_NAMES))``, columns in the order
        of ``FEATURE_NAMES``.

    Raises:
        DataError: an item is not a PIL image, or an alpha not an "L" image of its image's
            size (``rows`` names its index), ``size`` < 8, or ``blockiness`` or ``alpha`` does
            not have one entry per image.
    """
    if size < 8:
        raise DataError(f"quality_features: size must be >= 8, got {size}")
    known: list[float | None] = [None] * len(images) if blockiness is None else list(blockiness)
    alphas: list[Image.Image | None] = [None] * len(images) if alpha is None else list(alpha)
    for given, what in ((known, "blockiness values"), (alphas, "alphas")):
        if len(given) != len(images):
            raise DataError(f"quality_features: {len(given)} {what} for {len(images)} images")
    for i, (img, a) in enumerate(zip(images, alphas, strict=True)):
        if not isinstance(img, Image.Image):
            raise DataError(
                f"quality_features: item {i} is a {type(img).__name__}, not a PIL image",
                rows=[i],
            )
        if a is not None and not (
            isinstance(a, Image.Image) and a.mode == "L" and a.size == img.size
        ):
            got = f"mode {a.mode} {a.size}" if isinstance(a, Image.Image) else type(a).__name__
            raise DataError(
                f"quality_features: alpha {i} must be an L image of {img.size}, got {got}",
                rows=[i],
            )
    out = np.zeros((len(images), len(FEATURE_NAMES)), dtype=np.float32)
    for start in range(0, len(images), _CHUNK):
        end = start + _CHUNK
        chunk, masks = [], []
        for img, a in zip(images[start:end], alphas[start:end], strict=True):
            rgb, own = _rgb(img)
            chunk.append(rgb)
            masks.append(opaque_mask(a if a is not None else own, size))
        out[start : start + len(chunk)] = _features(chunk, size, known[start:end], masks)
    return out


def quality_record(
    img: Image.Image, *, size: int = 256, alpha: Image.Image | None = None
) -> dict[str, float]:
    """Quality features of one image as a ``{name: value}`` dict (see ``quality_features``)."""
    row = quality_features([img], size=size, alpha=[alpha])[0]
    return {name: float(v) for name, v in zip(FEATURE_NAMES, row, strict=True)}


def _rgb(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    # decode_image's conversion, not PIL's convert("RGB"): that one drops alpha (what lies
    # behind a transparent pixel, often black, would be measured) and clips 16-bit and float
    # greys to white, so an image handed over undecoded would be measured unlike its file.
    if img.mode == "RGB" and not img.has_transparency_data:
        return img, None
    return split_alpha(img)


def opaque_mask(alpha: Image.Image | None, size: int) -> np.ndarray | None:
    """Where an alpha, resized as the pixels are, is opaque: ``(size, size)`` bool.

    None (measure the whole frame) for no alpha, and for an alpha opaque everywhere or nowhere
    at that size: the first is measured exactly as an image without alpha, the second (a blank)
    has no subject to measure.
    """
    if alpha is None:
        return None
    small = alpha.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    mask = np.asarray(small) >= OPAQUE
    return mask if mask.any() and not mask.all() else None


def _features(
    images: list[Image.Image],
    size: int,
    known: list[float | None],
    masks: list[np.ndarray | None],
) -> np.ndarray:
    # reducing_gap: a fast integer pre-reduction for big photos before the exact resample.
    rgb = (
        np.stack(
            [
                np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))
                for im in images
            ]
        ).astype(np.float32)
        / 255.0
    )  # (N, S, S, 3)
    grey = rgb @ _LUMA  # (N, S, S) in [0, 1]

    # 4-neighbour Laplacian on the interior, on the 0..255 scale so log1p spans the decades
    # between a defocused frame (var ~1) and a crisp, detailed one (var ~1e3).
    g255 = grey * 255.0
    sharpness = np.log1p(laplacian(g255).var(axis=(1, 2)))

    # Immerkaer's mask removes smooth content; the median (not his mean) of the residual keeps
    # edges and texture, which are sparse, from reading as noise.
    resid = np.zeros_like(grey[:, 1:-1, 1:-1])
    for dy, row in enumerate(_IMMERKAER):
        for dx, w in enumerate(row):
            resid += w * grey[:, dy : dy + size - 2, dx : dx + size - 2]
    noise = _MAD_TO_STD * np.median(np.abs(resid), axis=(1, 2)) / 6.0

    # Hasler & Suesstrunk: opponent channels rg = R - G and yb = (R + G) / 2 - B; on RGB in
    # [0, 1] the metric is theirs / 255, so typical photos land in 0..0.5.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    brightness, clip_dark, clip_bright, contrast, colorfulness = _levels(
        grey, g255, rg, yb, axis=(1, 2)
    )
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        # The same statistics over the opaque pixels only (module docstring: transparency).
        levels = _levels(grey[i][mask], g255[i][mask], rg[i][mask], yb[i][mask], axis=None)
        for column, value in zip(
            (brightness, clip_dark, clip_bright, contrast, colorfulness), levels, strict=True
        ):
            column[i] = value
        inner = opaque_interior(mask)
        if inner.any():
            noise[i] = _MAD_TO_STD * np.median(np.abs(resid[i][inner])) / 6.0

    blockiness = np.array(
        [image_blockiness(im) if b is None else b for im, b in zip(images, known, strict=True)],
        dtype=np.float32,
    )
    width = np.array([im.width for im in images], dtype=np.float32)
    height = np.array([im.height for im in images], dtype=np.float32)
    return np.stack(
        [
            sharpness,
            brightness,
            clip_dark,
            clip_bright,
            contrast,
            noise,
            colorfulness,
            blockiness,
            width,
            height,
        ],
        axis=1,
    )


def _levels(
    grey: np.ndarray, g255: np.ndarray, rg: np.ndarray, yb: np.ndarray, *, axis: Any
) -> tuple[np.ndarray, ...]:
    """brightness, clip_dark, clip_bright, contrast and colorfulness over ``axis``: a batch's
    ``(1, 2)``, or None for one image's opaque pixels."""
    return (
        grey.mean(axis=axis),
        # Compare on the 0..255 scale with a half-level tolerance: luma of uint8 RGB is not an
        # integer, and a pure-black or pure-white pixel must count whatever the float rounding.
        (g255 <= 2.5).mean(axis=axis),
        (g255 >= 252.5).mean(axis=axis),
        grey.std(axis=axis),
        np.sqrt(rg.var(axis=axis) + yb.var(axis=axis))
        + 0.3 * np.sqrt(rg.mean(axis=axis) ** 2 + yb.mean(axis=axis) ** 2),
    )


def opaque_interior(mask: Any) -> Any:
    """The pixels of an ``(S, S)`` bool mask whose 3x3 neighbourhood is all in it, as an
    ``(S-2, S-2)`` mask aligned with the noise residual: numpy or torch alike."""
    s = mask.shape[-1]
    inner = mask[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            inner = inner & mask[dy : dy + s - 2, dx : dx + s - 2]
    return inner


def laplacian(grey: Any) -> Any:
    """The 4-neighbour Laplacian of ``(N, H, W)`` greys on the interior: numpy or torch alike."""
    return (
        grey[:, :-2, 1:-1]
        + grey[:, 2:, 1:-1]
        + grey[:, 1:-1, :-2]
        + grey[:, 1:-1, 2:]
        - 4.0 * grey[:, 1:-1, 1:-1]
    )


def image_blockiness(img: Image.Image) -> float:
    """The blockiness feature of an image as given: see ``block_grid_ratio``.

    Measured on the central (up to) 512 x 512 crop, cut on the 8-pixel grid; 1.0 for an image
    under 16 x 16. Meaningful only on pixels at the resolution they were compressed at.
    """
    w = min(img.width, BLOCK_CROP) // 8 * 8
    h = min(img.height, BLOCK_CROP) // 8 * 8
    if w < 16 or h < 16:
        return 1.0  # too small to hold a block boundary on both sides
    x0 = (img.width - w) // 2 // 8 * 8
    y0 = (img.height - h) // 2 // 8 * 8
    return block_grid_ratio(np.asarray(img.crop((x0, y0, x0 + w, y0 + h)).convert("L")))


def block_grid_ratio(grey: np.ndarray) -> float:
    """Mean |gradient| across the 8-pixel block grid over mean |gradient| elsewhere.

    The grid phase is not assumed to be 0: a crop or EXIF rotation after compression shifts
    it, so the phase (0..7) with the largest mean gradient is taken as the grid, per direction.
    An unblocked image scores ~1 (slightly above, from taking that maximum); heavy JPEG
    compression scores 1.5 and more. The ratio is symmetric in the two directions and the
    phase is searched, so a transposed or flipped image scores the same (up to edge rows).

    Args:
        grey: a 2-D greyscale array on the 0..255 scale, at least 16 x 16, at the resolution
            the image was compressed at (a downscaled image has lost its grid).

    Returns:
        The ratio, averaged over the horizontal and vertical directions.
    """
    grey = np.asarray(grey, dtype=np.float32)
    ratios = []
    for d in (np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0)).T):
        # d[:, j] is the step between columns j and j+1; trim to whole 8-column phases.
        n = d.shape[1] // 8 * 8
        per_phase = d[:, :n].reshape(d.shape[0], n // 8, 8).mean(axis=(0, 1))  # (8,)
        k = int(per_phase.argmax())
        others = np.delete(per_phase, k).mean()
        # +0.5 grey levels: flat images give ~1 instead of 0/0.
        ratios.append((per_phase[k] + 0.5) / (others + 0.5))
    return float(np.mean(ratios))
