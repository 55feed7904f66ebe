"""Image preparation on the model's device: decoded tensors -> model pixels + quality features.

On a GPU node decode happens beside the model (``keeper_core.decoders.GpuDecoder``): the pixels
are already on the device, and sending them back to the CPU for ``ImagePreparation``'s resize,
crop and quality features would cost a copy each way and the CPU time GPU decode was meant to
save. This module computes the same outputs from ``(3, H, W)`` uint8 tensors with torch alone,
on whatever device they are on, so the ranker sees the features it was trained on
(``keeper_core.preparation`` is the reference; tests hold this module to it on the CPU).

PIL's resampling, reproduced rather than approximated. ``torch.nn.functional.interpolate(...,
antialias=True)`` uses PIL's filters but rounds nowhere and has neither the ``box`` nor the
``reducing_gap`` pre-reduction the quality resize uses (an integer box reduce with PIL's
rounding, then a bilinear resample of a fractional box): on the test photos it lands within
0.25 levels (mean) of PIL's pixels and 0.02 of its sharpness (log scale). Close, but then a GPU
node's features would drift from a CPU node's for no reason. Here every resize is PIL's
integer arithmetic: its taps and 22-bit fixed-point weights (``precompute_coeffs``, built once
per size on the CPU and cached on the device), int32 sums rounded to 8 bits after each pass,
the installed Pillow's pass order (from Pillow 13, vertical first when the height shrinks by
more than twice what the width does), and ``Image.reduce``'s ``(sum + n/2) * multiplier >> 24``.
Integers throughout, so the pixels are bit-identical to PIL's on any device (TF32 settings do
not apply), and the features equal ``quality_features``'s up to float32 summation order
(< 1e-5 measured) when given the same decoded pixels. What differs on a GPU node is the decode
itself (nvJPEG, a box draft rather than a DCT one: ``keeper_core.decoders``). Each pass gathers
all its taps at once: three kernels whatever the filter's width, which matters more on a GPU
fed images of many sizes than the (output x taps) int32 temporary does.

Blockiness of a drafted JPEG is measured on full-resolution pixels, as ``ImagePreparation``
does: ``GpuDecoder.decode_batch_with_bands`` hands back the top stored rows of the full decode
before its draft shrink (the rows ``images.decode_jpeg_band`` decodes, as PIL's "L" of the RGB
rather than libjpeg's Y: within +-1 level), so no second decode is needed on the CPU. What the
device could not decode (CMYK, PNG, a broken JPEG) was decoded by the CPU backend, and its band
is decoded there too. Such an image with transparency (a PNG, WebP or TIFF cut-out) comes with
the alpha the CPU backend composited, so its features are measured where it is opaque, as
``ImagePreparation`` measures them (``keeper_core.quality``'s module docstring).

    prep = DevicePreparation("ViT-B-32:laion2b_s34b_b79k", device="cuda:0",
                             decoder=GpuDecoder("cuda:0"))
    out = prep.prepare([(data, uri) for data, uri in blobs])
    emb = embedder.embed_pixels(out.pixels)        # (M, 3, S, S) uint8, already on cuda:0
    feats = out.features                           # (M, len(FEATURE_NAMES)) float32 on cuda:0
    failed = out.errors                            # [(index into blobs, ImageDecodeError)]
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from keeper_core.decoders import Decoder, GpuDecoder
from keeper_core.errors import ConfigError, DataError, ImageDecodeError
from keeper_core.images import (
    DecodeLimits,
    RawPreview,
    image_size,
    raw_preview,
)
from keeper_core.models import ModelSpec, PreprocessConfig, preprocess_config
from keeper_core.preparation import BAND_PIXELS, QUALITY_SIZE, ImagePreparation
from keeper_core.quality import BLOCK_CROP, FEATURE_NAMES, OPAQUE, laplacian, opaque_interior

__all__ = [
    "DevicePreparation",
    "DevicePrepared",
    "block_grid_ratio_tensor",
    "dhash_tensor",
    "grey_tensor",
    "model_resize_tensor",
    "quality_features_tensor",
]

# PIL's fixed-point resampling of 8-bit images: 32 - 8 - 2 bits of coefficient.
_PRECISION = float(1 << 22)
# quality.py's resize: PIL's BILINEAR with reducing_gap=3 (an integer reduce first).
_REDUCING_GAP = 3.0
# Images per vectorised chunk of the quality maths, as quality.py (bounds peak memory).
_CHUNK = 64
# Pixels of one stacked resize batch (same-size images): ~200 MB of int32 RGB at most.
_BATCH_PIXELS = 1 << 24
_LUMA = (0.299, 0.587, 0.114)  # quality.py's Rec. 601 weights
_IMMERKAER = ((1, -2, 1), (-2, 4, -2), (1, -2, 1))
_MAD_TO_STD = 1.4826
_WIDTH, _HEIGHT = FEATURE_NAMES.index("width"), FEATURE_NAMES.index("height")


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bilinear(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# PIL's filters and their supports (libImaging/Resample.c).
_FILTERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "box": (_box, 0.5),
    "bilinear": (_bilinear, 1.0),
    "bicubic": (_bicubic, 2.0),
}


@functools.lru_cache(maxsize=512)
def _coefficients(
    in_size: int, in0: float, in1: float, out_size: int, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """PIL's integer resampling taps: ``(first, weights)`` of shapes ``(out,)``, ``(out, K)``.

    ``precompute_coeffs`` then ``normalize_coeffs_8bpc`` (libImaging/Resample.c): output pixel
    o is ``sum_k weights[o, k] * in[first[o] + k]`` in units of 2**-22. Taps past a row's end
    (or the image's) have weight 0. ``in0``/``in1`` are the source box, C floats in PIL.
    """
    fn, fsupport = _FILTERS[kind]
    in0, in1 = float(np.float32(in0)), float(np.float32(in1))
    scale = float(np.float32(in1) - np.float32(in0)) / out_size
    filterscale = max(scale, 1.0)
    support = fsupport * filterscale
    ksize = math.ceil(support) * 2 + 1
    center = in0 + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    valid = taps[None, :] < xmax[:, None]
    w = fn(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) / filterscale) * valid
    ww = np.cumsum(w, axis=1)[:, -1:]  # PIL sums in order: cumsum is sequential, sum is not
    w = np.divide(w, ww, out=w.copy(), where=ww != 0.0)
    scaled = w * _PRECISION
    quantised = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    return xmin, quantised.astype(np.int32)


def _pillow_major() -> int:
    import PIL

    return int(PIL.__version__.split(".")[0])


# Which pass PIL runs first when both are needed: horizontal always before Pillow 13; from 13
# (python-pillow/Pillow#9549) vertical when the height shrinks by more than twice the pixels
# the width does. The order decides where the 8-bit intermediate rounding falls.
_PILLOW_13 = _pillow_major() >= 13


def _vertical_first(shrink_w: int, shrink_h: int) -> bool:
    return _PILLOW_13 and shrink_h > max(0, 2 * shrink_w)


_device_taps: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _taps(
    in_size: int,
    box: tuple[float, float],
    out_size: int,
    kind: str,
    keep: tuple[int, int],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output pixels ``keep[0]:keep[1]``'s source indices and int32 weights, ``(rows, K)`` each.

    Cached per size and device: a batch of photos comes in a few sizes.
    """
    key = (in_size, box, out_size, kind, keep, str(device))
    hit = _device_taps.get(key)
    if hit is None:
        first, weights = _coefficients(in_size, box[0], box[1], out_size, kind)
        first, weights = first[keep[0] : keep[1]], weights[keep[0] : keep[1]]
        index = np.minimum(first[:, None] + np.arange(weights.shape[1]), in_size - 1)
        hit = (torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device))
        if len(_device_taps) >= 512:  # bound the odd sizes a long run sees
            _device_taps.clear()
        _device_taps[key] = hit
    return hit


def _pass(x: torch.Tensor, taps: tuple[torch.Tensor, torch.Tensor], dim: int) -> torch.Tensor:
    """One PIL resampling pass along ``dim`` (-1 or -2) of int32 8-bit values, exactly.

    PIL's arithmetic: int32 sums of pixel x 22-bit weight (bounded so they never overflow,
    as in PIL), plus 2**21, shifted down 22 bits and clipped to 0..255. All taps are gathered
    at once (three kernels whatever the filter's width, which matters on a GPU fed images of
    many sizes), in steps that keep the ``(..., out, taps)`` temporary to ~_BATCH_PIXELS.
    """
    index, weights = taps
    out_shape = list(x.shape)
    out_shape[dim] = index.shape[0]
    step = max(1, _BATCH_PIXELS // math.prod(out_shape))
    total = torch.full(out_shape, 1 << 21, dtype=torch.int32, device=x.device)
    for k in range(0, index.shape[1], step):
        i, w = index[:, k : k + step], weights[:, k : k + step]
        if dim == -1:
            total += (x[..., i] * w).sum(-1, dtype=torch.int32)
        else:
            total += (x[..., i, :] * w[..., None]).sum(-2, dtype=torch.int32)
    return total.bitwise_right_shift_(22).clamp_(0, 255)


def _resample(
    x: torch.Tensor,
    out_w: int,
    out_h: int,
    kind: str,
    *,
    box: tuple[float, float, float, float] | None = None,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """PIL's ``Image.resize(..., box=box)`` of ``(..., H, W)`` 8-bit values held as int32.

    ``rows``/``cols`` keep only those output rows/columns: a crop of the result, computed as
    part of it (PIL rounds each output pixel on its own, so cropping the weights is exact).
    """
    h, w = x.shape[-2:]
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(w), float(h))
    rows = rows or (0, out_h)
    cols = cols or (0, out_w)
    if (w, h) == (out_w, out_h) and (x0, y0, x1, y1) == (0, 0, w, h):
        return x[..., rows[0] : rows[1], cols[0] : cols[1]]
    # ImagingResampleInner's tests, verbatim (box[2] against the output width is PIL's).
    need_h = out_w != w or x0 or x1 != out_w
    need_v = out_h != h or y0 or y1 != out_h
    if need_h and need_v and _vertical_first(w - out_w, h - out_h):
        x = _pass(x, _taps(h, (y0, y1), out_h, kind, rows, x.device), -2)
        return _pass(x, _taps(w, (x0, x1), out_w, kind, cols, x.device), -1)
    if need_h:
        x = _pass(x, _taps(w, (x0, x1), out_w, kind, cols, x.device), -1)
    else:
        x = x[..., cols[0] : cols[1]]
    if need_v:
        x = _pass(x, _taps(h, (y0, y1), out_h, kind, rows, x.device), -2)
    else:
        x = x[..., rows[0] : rows[1], :]
    return x


def _reduce(x: torch.Tensor, fx: int, fy: int) -> torch.Tensor:
    """PIL's ``Image.reduce((fx, fy))``: block means with its fixed-point rounding.

    Blocks at the right and bottom edges are partial (``ceil`` output sides) and are averaged
    over the pixels they hold, as ``ImagingReduceCorners`` does.
    """
    h, w = x.shape[-2:]
    # float32 sums of 8-bit values are exact below 2**24 (blocks of up to 65,793 pixels).
    sums = torch.nn.functional.avg_pool2d(
        x.reshape(-1, 1, h, w).float(),
        (fy, fx),
        stride=(fy, fx),
        ceil_mode=True,
        divisor_override=1,
    )
    oh, ow = sums.shape[-2:]
    ny = np.full(oh, fy, np.int64)
    nx = np.full(ow, fx, np.int64)
    ny[-1], nx[-1] = h - fy * (oh - 1), w - fx * (ow - 1)
    n = ny[:, None] * nx[None, :]
    # division_UINT32: a float32 quotient, truncated.
    multiplier = (np.float32(2.0**32) / (256 * n).astype(np.float32)).astype(np.int64)
    amend = torch.from_numpy(n // 2).to(x.device)
    mult = torch.from_numpy(multiplier).to(x.device)
    out = ((sums.to(torch.int64) + amend) * mult) >> 24
    return out.to(torch.int32).reshape(*x.shape[:-2], oh, ow)


def _resize_reducing_gap(x: torch.Tensor, size: int, kind: str, gap: float) -> torch.Tensor:
    """PIL's ``resize((size, size), kind, reducing_gap=gap)`` of ``(..., H, W)``."""
    h, w = x.shape[-2:]
    if (w, h) == (size, size):
        return x
    fx = int(w / size / gap) or 1
    fy = int(h / size / gap) or 1
    if fx == 1 and fy == 1:
        return _resample(x, size, size, kind)
    # The reduce box is the whole image (no support reaches outside it), so the resample's
    # box is the image's extent in reduced pixels: fractional where a side is not a multiple.
    return _resample(_reduce(x, fx, fy), size, size, kind, box=(0.0, 0.0, w / fx, h / fy))


def grey_tensor(rgb: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of uint8 RGB ``(..., 3, H, W)``: uint8 ``(..., H, W)``, bit-exact.

    ``L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16`` (Pillow's Convert.c, Rec. 601 luma).
    """
    c = rgb.to(torch.int32)
    r, g, b = c[..., 0, :, :], c[..., 1, :, :], c[..., 2, :, :]
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)


def _check_images(images: Sequence[torch.Tensor], what: str) -> None:
    for i, im in enumerate(images):
        if not (isinstance(im, torch.Tensor) and im.dtype == torch.uint8 and im.ndim == 3):
            got = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, torch.Tensor) else type(im)
        elif im.shape[0] != 3:
            got = f"shape {tuple(im.shape)}"
        else:
            continue
        raise DataError(
            f"{what}: item {i} must be a uint8 (3, H, W) RGB tensor, got {got}", rows=[i]
        )


def _by_shape(
    images: Sequence[torch.Tensor],
) -> list[tuple[list[int], torch.Tensor]]:
    """Indices and a stacked int32 batch per image size, at most ``_BATCH_PIXELS`` a batch."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        groups[tuple(im.shape)].append(i)
    out = []
    for shape, idx in groups.items():
        per = max(1, _BATCH_PIXELS // (shape[1] * shape[2]))
        for s in range(0, len(idx), per):
            part = idx[s : s + per]
            out.append((part, torch.stack([images[i] for i in part]).to(torch.int32)))
    return out


def _grid_ratio(grey: torch.Tensor) -> torch.Tensor:
    """``quality.block_grid_ratio`` as a 0-d float64 tensor on ``grey``'s device."""
    g = grey.to(torch.float32)
    ratios = []
    for d in ((g[:, 1:] - g[:, :-1]).abs(), (g[1:, :] - g[:-1, :]).abs().T):
        n = d.shape[1] // 8 * 8
        blocks = d[:, :n].reshape(d.shape[0], n // 8, 8)
        # Integer steps: float64 sums are exact, as numpy's float32 ones are below 2**24.
        per_phase = blocks.sum(dim=(0, 1), dtype=torch.float64) / (d.shape[0] * (n // 8))
        top = per_phase.max()
        others = (per_phase.sum() - top) / 7.0
        ratios.append((top + 0.5) / (others + 0.5))
    return (ratios[0] + ratios[1]) / 2.0


def block_grid_ratio_tensor(grey: torch.Tensor) -> float:
    """``keeper_core.quality.block_grid_ratio`` of a 2-D grey tensor (0..255), on its device.

    Equal to the numpy function on the same values up to float rounding (the per-phase sums
    are exact here; numpy's float32 ones are exact below 2**24, i.e. any crop or band keeper
    measures on).

    Raises:
        DataError: ``grey`` is not 2-D or is smaller than 16 x 16.
    """
    if grey.ndim != 2 or min(grey.shape) < 16:
        raise DataError(
            f"block_grid_ratio_tensor: need a 2-D grey >= 16 x 16, got {tuple(grey.shape)}"
        )
    return float(_grid_ratio(grey))


def _blockiness(rgb: torch.Tensor) -> torch.Tensor:
    """``quality.image_blockiness``: the central crop on the 8-pixel grid, PIL's "L", the ratio."""
    _, height, width = rgb.shape
    w = min(width, BLOCK_CROP) // 8 * 8
    h = min(height, BLOCK_CROP) // 8 * 8
    if w < 16 or h < 16:
        return torch.ones((), dtype=torch.float64, device=rgb.device)
    x0 = (width - w) // 2 // 8 * 8
    y0 = (height - h) // 2 // 8 * 8
    return _grid_ratio(grey_tensor(rgb[:, y0 : y0 + h, x0 : x0 + w]))


def _median(x: torch.Tensor) -> torch.Tensor:
    """numpy's median along dim 1: the mean of the two middle values when the count is even."""
    n = x.shape[1]
    upper = x.kthvalue(n // 2 + 1, dim=1).values
    if n % 2:
        return upper
    return (x.kthvalue(n // 2, dim=1).values + upper) / 2.0


def _opaque_mask(alpha: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """``quality.opaque_mask`` of a uint8 ``(H, W)`` alpha: the same resize, bit for bit."""
    if alpha is None:
        return None
    small = _resize_reducing_gap(alpha.to(torch.int32), size, "bilinear", _REDUCING_GAP)
    mask = small >= OPAQUE
    opaque = int(mask.sum())  # a sync, for images with transparency only
    return mask if 0 < opaque < mask.numel() else None


def _levels(
    grey: torch.Tensor,
    g255: torch.Tensor,
    rg: torch.Tensor,
    yb: torch.Tensor,
    *,
    dim: tuple[int, ...] | None,
) -> tuple[torch.Tensor, ...]:
    """quality.py's ``_levels``: brightness, clips, contrast, colorfulness over ``dim``."""
    return (
        grey.mean(dim=dim),
        (g255 <= 2.5).float().mean(dim=dim),
        (g255 >= 252.5).float().mean(dim=dim),
        grey.std(dim=dim, correction=0),
        torch.sqrt(rg.var(dim=dim, correction=0) + yb.var(dim=dim, correction=0))
        + 0.3 * torch.sqrt(rg.mean(dim=dim) ** 2 + yb.mean(dim=dim) ** 2),
    )


def _features(rgb255: torch.Tensor, masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """quality.py's ``_features`` columns 0..6 of ``(N, 3, S, S)`` 8-bit values as float32."""
    size = rgb255.shape[-1]
    rgb = rgb255 / 255.0
    luma = torch.tensor(_LUMA, dtype=torch.float32, device=rgb.device)
    grey = torch.einsum("nchw,c->nhw", rgb, luma)
    g255 = grey * 255.0
    sharpness = torch.log1p(laplacian(g255).var(dim=(1, 2), correction=0))
    resid = torch.zeros_like(grey[:, 1:-1, 1:-1])
    for dy, row in enumerate(_IMMERKAER):
        for dx, w in enumerate(row):
            resid += w * grey[:, dy : dy + size - 2, dx : dx + size - 2]
    noise = _MAD_TO_STD * _median(resid.abs().flatten(1)) / 6.0
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    brightness, clip_dark, clip_bright, contrast, colorfulness = _levels(
        grey, g255, rg, yb, dim=(1, 2)
    )
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        # quality.py's statistics over the opaque pixels only.
        levels = _levels(grey[i][mask], g255[i][mask], rg[i][mask], yb[i][mask], dim=None)
        for column, value in zip(
            (brightness, clip_dark, clip_bright, contrast, colorfulness), levels, strict=True
        ):
            column[i] = value
        inner = resid[i][opaque_interior(mask)]
        if inner.numel():
            noise[i] = _MAD_TO_STD * _median(inner.abs()[None])[0] / 6.0
    return torch.stack(
        [sharpness, brightness, clip_dark, clip_bright, contrast, noise, colorfulness], dim=1
    )


def quality_features_tensor(
    images: Sequence[torch.Tensor],
    *,
    size: int = 256,
    blockiness: Sequence[float | torch.Tensor | None] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    alpha: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``keeper_core.quality.quality_features`` of uint8 ``(3, H, W)`` RGB tensors, on their device.

    The same definitions (``FEATURE_NAMES``) on the same resize: PIL's bilinear with
    ``reducing_gap=3``, bit for bit (see the module docstring), so the values equal the CPU's
    up to float32 summation order of the statistics (< 1e-6 measured, in the tests).

    Args:
        images: RGB tensors of any sizes, all on one device.
        size: side of the square the resolution dependent features are computed at.
        blockiness: per image, blockiness measured on full-resolution pixels (a drafted
            decode; a float or a 0-d tensor, which saves a device sync); None entries, or no
            sequence, are measured here on the central crop.
        sizes: per image, the original displayed ``(width, height)``; default: the tensor's.
        alpha: per image, the alpha composited into it: uint8 ``(H, W)`` on its device, or None
            (no transparency). Measured where it is opaque, as ``quality_features``.

    Returns:
        ``(len(images), len(FEATURE_NAMES))`` float32 on the images' device (CPU when empty).

    Raises:
        DataError: an item is not a uint8 (3, H, W) tensor, or an alpha not a uint8 (H, W) one,
            ``size`` < 8, or ``blockiness``, ``sizes`` or ``alpha`` does not have one entry per
            image.
    """
    if size < 8:
        raise DataError(f"quality_features_tensor: size must be >= 8, got {size}")
    _check_images(images, "quality_features_tensor")
    n = len(images)
    known: list[float | torch.Tensor | None] = (
        [None] * n if blockiness is None else list(blockiness)
    )
    dims = [(int(im.shape[2]), int(im.shape[1])) for im in images] if sizes is None else list(sizes)
    alphas: list[torch.Tensor | None] = [None] * n if alpha is None else list(alpha)
    if len(known) != n or len(dims) != n or len(alphas) != n:
        raise DataError(
            f"quality_features_tensor: {len(known)} blockiness values, {len(dims)} sizes and "
            f"{len(alphas)} alphas for {n} images"
        )
    for i, (im, a) in enumerate(zip(images, alphas, strict=True)):
        if a is not None and not (
            isinstance(a, torch.Tensor) and a.dtype == torch.uint8 and a.shape == im.shape[1:]
        ):
            got = f"{a.dtype} {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a)
            raise DataError(
                f"quality_features_tensor: alpha {i} must be a uint8 {tuple(im.shape[1:])} "
                f"tensor, got {got}",
                rows=[i],
            )
    device = images[0].device if n else torch.device("cpu")
    out = torch.zeros((n, len(FEATURE_NAMES)), dtype=torch.float32, device=device)
    for start in range(0, n, _CHUNK):
        chunk = images[start : start + _CHUNK]
        resized = torch.empty((len(chunk), 3, size, size), dtype=torch.float32, device=device)
        for idx, batch in _by_shape(chunk):
            resized[idx] = _resize_reducing_gap(batch, size, "bilinear", _REDUCING_GAP).float()
        masks = [_opaque_mask(a, size) for a in alphas[start : start + _CHUNK]]
        out[start : start + len(chunk), :7] = _features(resized, masks)
        block = [
            _blockiness(im) if b is None else torch.as_tensor(b, dtype=torch.float64, device=device)
            for im, b in zip(chunk, known[start : start + _CHUNK], strict=True)
        ]
        out[start : start + len(chunk), 7] = torch.stack(block).to(torch.float32)
    out[:, _WIDTH] = torch.tensor([w for w, _ in dims], dtype=torch.float32, device=device)
    out[:, _HEIGHT] = torch.tensor([h for _, h in dims], dtype=torch.float32, device=device)
    return out


@dataclass(frozen=True)
class _Geometry:
    """Where one image's model input comes from: resize to ``size``, then crop or pad."""

    size: tuple[int, int]  # resized (width, height)
    crop: tuple[int, int]  # top-left of the crop in the resized image (x, y), >= 0
    pad: tuple[int, int]  # where the crop lands on the output canvas (x, y), >= 0


def _geometry(cfg: PreprocessConfig, width: int, height: int) -> _Geometry:
    """open_clip's eval geometry (``image_transform(is_train=False)``) for one image size."""
    s = cfg.image_size
    if cfg.resize_mode == "squash":
        return _Geometry((s, s), (0, 0), (0, 0))
    if cfg.resize_mode == "shortest":
        # torchvision's Resize(s): the short side to s, the long one int(s * long / short).
        if width <= height:
            rw, rh = s, int(s * height / width)
        else:
            rw, rh = int(s * width / height), s
    elif cfg.resize_mode == "longest":
        # open_clip's ResizeKeepRatio(longest=1): both sides / the larger ratio, rounded.
        ratio = max(height / s, width / s)
        rw, rh = round(width / ratio), round(height / ratio)
    else:
        raise ConfigError(f"unknown resize_mode {cfg.resize_mode!r} (shortest, longest, squash)")

    def place(r: int) -> tuple[int, int]:
        if r >= s:  # CenterCrop: torchvision rounds the offset (half to even, as Python)
            return round((r - s) / 2.0), 0
        return 0, (s - r) // 2  # CenterCropOrPad: pad first (left/top gets the floor)

    (cx, px), (cy, py) = place(rw), place(rh)
    return _Geometry((rw, rh), (cx, cy), (px, py))


def model_resize_tensor(
    spec: str | ModelSpec | PreprocessConfig, images: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The model's uint8 input ``(N, 3, S, S)`` from RGB tensors: ``resize_transform(spec)``.

    The same geometry as open_clip's eval transform (shortest-side resize + centre crop,
    longest-side resize + centre pad with black, or a squash), resampled with PIL's bicubic
    (or bilinear) arithmetic on the tensors' device; only the output rows and columns the crop
    keeps are computed.

    Raises:
        DataError: an item is not a uint8 (3, H, W) tensor.
        ConfigError: the spec's resize mode or interpolation is not one open_clip has.
    """
    cfg = spec if isinstance(spec, PreprocessConfig) else preprocess_config(spec)
    if cfg.interpolation not in ("bicubic", "bilinear", "random"):
        raise ConfigError(f"unknown interpolation {cfg.interpolation!r} (bicubic, bilinear)")
    kind = "bilinear" if cfg.interpolation == "bilinear" else "bicubic"  # open_clip's rule
    _check_images(images, "model_resize_tensor")
    s = cfg.image_size
    device = images[0].device if images else torch.device("cpu")
    out = torch.zeros((len(images), 3, s, s), dtype=torch.uint8, device=device)
    for idx, batch in _by_shape(images):
        g = _geometry(cfg, batch.shape[-1], batch.shape[-2])
        (rw, rh), (cx, cy), (px, py) = g.size, g.crop, g.pad
        cw, ch = min(rw, s), min(rh, s)
        pixels = _resample(batch, rw, rh, kind, rows=(cy, cy + ch), cols=(cx, cx + cw))
        out[idx, :, py : py + ch, px : px + cw] = pixels.to(torch.uint8)
    return out


def _dhashes(images: Sequence[torch.Tensor]) -> list[int]:
    out = [0] * len(images)
    for idx, batch in _by_shape(images):
        small = _resample(grey_tensor(batch).to(torch.int32), 9, 8, "box")  # (B, 8, 9)
        bits = (small[:, :, 1:] > small[:, :, :-1]).reshape(len(idx), 64).tolist()
        for i, row in zip(idx, bits, strict=True):
            out[i] = _pack(row)
    return out


def dhash_tensor(image: torch.Tensor) -> int:
    """``keeper_core.grouping.dhash`` of a uint8 ``(3, H, W)`` RGB tensor, bit-exact.

    PIL's "L" is integer arithmetic, and its BOX resize to 9 x 8 is reproduced with PIL's
    fixed-point weights and rounding (each output pixel the mean of the whole source pixels
    whose centres fall in its cell: PIL's box filter has no fractional coverage). Same bit
    order and signed-int64 convention.

    Raises:
        DataError: ``image`` is not a uint8 (3, H, W) tensor.
    """
    _check_images([image], "dhash_tensor")
    return _dhashes([image])[0]


def _pack(bits: list[bool]) -> int:
    value = 0
    for bit in bits:  # most significant first, as np.packbits(...).view(">u8")
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class DevicePrepared:
    """The prepared batch: what decoded, on the device, and what did not.

    Attributes:
        pixels: ``(M, 3, S, S)`` uint8 model input of the M images that decoded.
        features: ``(M, len(FEATURE_NAMES))`` float32 quality features (same device).
        dhash: per decoded image, ``grouping.dhash`` of its decoded (maybe drafted) pixels.
        ok: indices into the input of the decoded images, in order (row i is item ok[i]).
        errors: ``(index, ImageDecodeError)`` for every item that did not decode.
        width, height: per decoded image, its original displayed size (before any draft).
    """

    pixels: torch.Tensor
    features: torch.Tensor
    dhash: list[int] = field(default_factory=list)
    ok: list[int] = field(default_factory=list)
    errors: list[tuple[int, ImageDecodeError]] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    height: list[int] = field(default_factory=list)


@dataclass
class _Decoded:
    index: int
    pixels: torch.Tensor  # (3, H, W) uint8 on the device
    width: int
    height: int
    blockiness: float | torch.Tensor | None
    alpha: torch.Tensor | None = None  # (H, W) uint8 on the device, for an image with transparency


class DevicePreparation:
    """``ImagePreparation``'s decode -> pixels + features + dhash, computed on one device.

    Args:
        spec: the ModelSpec whose input size and resize/crop the pixels get.
        device: where the outputs live and the maths runs ("cuda:0"; "cpu" in tests).
        limits: decode limits, as ``ImagePreparation``.
        draft: draft-decode large JPEGs, as ``ImagePreparation`` (blockiness from a band).
        decoder: a ``GpuDecoder`` decodes the whole batch at once (on its own device; the
            tensors are moved to ``device`` if it differs); any other backend decodes one image
            at a time through ``ImagePreparation.decode``. Default: PIL.
    """

    def __init__(
        self,
        spec: str | ModelSpec,
        *,
        device: str | torch.device = "cpu",
        limits: DecodeLimits | None = None,
        draft: bool = True,
        decoder: Decoder | None = None,
    ) -> None:
        self.spec = str(spec)
        self.device = torch.device(device)
        self._cpu = ImagePreparation(self.spec, limits=limits, draft=draft, decoder=decoder)
        self.decoder = self._cpu.decoder
        self.limits = self._cpu.limits
        self.draft_size = self._cpu.draft_size
        self.image_size = self._cpu.image_size
        self._config = self._cpu.preprocess  # read once, by ImagePreparation

    def prepare(self, items: Sequence[tuple[bytes, str | None]]) -> DevicePrepared:
        """Decode and prepare ``(data, source)`` pairs; a bad image is an error row, not a raise."""
        errors: list[tuple[int, ImageDecodeError]] = []
        if isinstance(self.decoder, GpuDecoder):
            decoded = self._decode_on_device(items, errors)
        else:
            decoded = self._decode_on_cpu(items, errors)
        errors.sort(key=lambda e: e[0])
        tensors = [d.pixels for d in decoded]
        sizes = [(d.width, d.height) for d in decoded]
        return DevicePrepared(
            pixels=model_resize_tensor(self._config, tensors).to(self.device),
            features=quality_features_tensor(
                tensors,
                size=QUALITY_SIZE,
                blockiness=[d.blockiness for d in decoded],
                sizes=sizes,
                alpha=[d.alpha for d in decoded],
            ).to(self.device),
            dhash=_dhashes(tensors),
            ok=[d.index for d in decoded],
            errors=errors,
            width=[w for w, _ in sizes],
            height=[h for _, h in sizes],
        )

    def _decode_on_cpu(
        self, items: Sequence[tuple[bytes, str | None]], errors: list[tuple[int, ImageDecodeError]]
    ) -> list[_Decoded]:
        out = []
        for i, (data, source) in enumerate(items):
            try:
                d = self._cpu.decode(data, source=source)
            except ImageDecodeError as e:
                errors.append((i, e))
                continue
            hwc = torch.from_numpy(np.array(d.image, dtype=np.uint8))
            chw = hwc.permute(2, 0, 1).contiguous().to(self.device)
            alpha = None
            if d.alpha is not None:
                alpha = torch.from_numpy(np.array(d.alpha, dtype=np.uint8)).to(self.device)
            out.append(_Decoded(i, chw, d.width, d.height, d.blockiness, alpha))
        return out

    def _decode_on_device(
        self, items: Sequence[tuple[bytes, str | None]], errors: list[tuple[int, ImageDecodeError]]
    ) -> list[_Decoded]:
        assert isinstance(self.decoder, GpuDecoder)
        srcs: list[tuple[int, bytes | RawPreview, str | None]] = []
        for i, (data, source) in enumerate(items):
            try:  # once per file, as ImagePreparation.decode: the decoder and the size share it
                srcs.append(
                    (i, raw_preview(data, limits=self.limits, source=source) or data, source)
                )
            except ImageDecodeError as e:
                errors.append((i, e))
        results = self.decoder.decode_batch_with_bands(
            [(src, source) for _, src, source in srcs],
            limits=self.limits,
            draft_size=self.draft_size,
            band_pixels=BAND_PIXELS,
        )
        out = []
        for (i, src, source), result in zip(srcs, results, strict=True):
            if isinstance(result, ImageDecodeError):
                errors.append((i, result))
                continue
            pixels, band, alpha = result
            height, width = pixels.shape[1:]
            blockiness: float | torch.Tensor | None = None
            if self.draft_size is not None:
                width, height = image_size(src)
                if (pixels.shape[2], pixels.shape[1]) != (width, height):
                    # No band: the CPU backend decoded (and drafted) it; measure there too.
                    blockiness = (
                        self._cpu.full_resolution_blockiness(src, source)
                        if band is None
                        else _grid_ratio(band)
                    )
            if alpha is not None:
                alpha = alpha.to(self.device)
            out.append(_Decoded(i, pixels.to(self.device), width, height, blockiness, alpha))
        return out
