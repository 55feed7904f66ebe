"""Decode backends with :func:`keeper_core.images.decode_image`'s contract, chosen by measurement.

Every backend takes the same input (encoded bytes or a :class:`RawPreview`) and gives the same
result: an 8-bit RGB image, EXIF-oriented, or an ``ImageDecodeError`` with the same reason
(``decode_alpha`` adds the alpha composited on white, for the quality features: only the
reference decodes formats with alpha, in every backend). The safety checks are the same code
(``keeper_core.images``): byte limit, signature, the header's pixel count and shortest side, and
a JPEG's scan count, all before a pixel is decoded. What differs is which library turns a JPEG's
entropy-coded data into pixels:

- ``pil`` (:class:`PilDecoder`): ``decode_image`` itself, the reference.
- ``turbo`` (:class:`TurboDecoder`): libjpeg-turbo through simplejpeg, for 8-bit Huffman JPEGs
  (baseline, extended, progressive) in YCbCr, RGB or greyscale, RAW previews included. Draft
  decodes use PIL's DCT scale (1/2, 1/4, 1/8, the same rule), so sizes equal PIL's, and pixels
  are bit-identical where both link libjpeg-turbo with its default (islow) IDCT, as the wheels do.
  A JPEG in another colour space (ICC profile, EXIF's Adobe RGB, or a RAW preview's colour
  space from its RAW) is converted to sRGB with the reference's own littlecms transform
  (``color_converted``).
- ``gpu`` (:class:`GpuDecoder`): ``torchvision.io.decode_jpeg`` (nvJPEG), a batch at a time,
  pixels left on the model's device. A JPEG whose profile is matrix/TRC (Display P3, Adobe RGB,
  ProPhoto RGB: every photo profile in practice) is converted to sRGB there too, a batch per
  profile, with littlecms's arithmetic in torch (``keeper_core.color.MatrixProfile``: the same
  pixels as the reference's conversion; ``color_converted``).
- ``nvimgcodec`` (:class:`GpuDecoder` with ``engine="nvimgcodec"``): NVIDIA nvImageCodec, a batch
  at a time, pixels left on the model's device. On A100/H100-class GPUs it can use their hardware
  JPEG decoders (its ``HW_GPU_ONLY`` backend), which torchvision's nvJPEG call does not; else its
  CUDA nvJPEG decoders. The same routing, fallbacks and counters as ``gpu``. Optional:
  ``pip install 'keeper-core[nvimgcodec]'`` (nvidia-nvimgcodec-cu13 with nvidia-nvjpeg).
- ``cpu``: the fastest CPU backend here. Pillow's wheels decode JPEG with libjpeg-turbo too, so
  the entropy decode and IDCT are the same code; turbo then pays a copy of its array into a PIL
  image. Measured (benchmarks/decode.py, one thread): turbo at 0.87x PIL's images/s on 12 MP full
  decodes, 0.86x at 1600x1200, 0.89x at 512x384, 0.89-1.01x on drafts. So ``cpu`` is ``pil``
  when Pillow's JPEG codec is libjpeg-turbo, and ``turbo`` only when it is not (IJG libjpeg)
  and simplejpeg is installed.
- ``auto``: ``gpu`` when decode happens beside a model on a CUDA device, else ``cpu``. (Not
  ``nvimgcodec``: it has not been measured against ``gpu`` on a GPU yet.)

Dispatch, not fallback. What a backend does not decode itself goes to the CPU reference by
rule, per image, and is counted by reason in the backend's ``delegated`` counter, so a run can
report how much of its input took the slow path:

    ``format:PNG`` (any non-JPEG, by magic bytes; ``format:unknown`` for no signature)
    ``mode:CMYK`` (CMYK/YCCK JPEGs: the reference converts them, from their embedded CMYK
        profile with littlecms, else with PIL's formula; a CMYK TIFF is ``format:TIFF``)
    ``process:SOF9/8bit`` (arithmetic, lossless, hierarchical or 12-bit JPEGs)
    ``icc`` (GPU backends only: an ICC profile of an RGB space other than sRGB that is not
        matrix/TRC, a LUT-based one; the reference converts it with littlecms)
    ``turbo_refused`` (simplejpeg's strict mode stops at any libjpeg warning: a truncated
        file, or recoverable corruption such as "extraneous bytes before marker" that PIL
        decodes through; PIL's verdict, "truncated" or pixels, is the contract)

The GPU backends also send MPO files (``format:MPO``) and JPEGs without an EOI after their first
scan (``incomplete``: truncated, which nvJPEG may not report) to the CPU backend, and counts a
JPEG the device fails to decode in ``fallbacks`` before the CPU backend decodes it.

    decoder = resolve_decoder("cpu")                # PilDecoder with Pillow's wheels
    img = decoder.decode(data, limits=limits, source=uri, draft_size=(256, 256))
    gpu = resolve_decoder("auto", device="cuda:0")  # GpuDecoder when this process sees CUDA
    out = gpu.decode_batch([(data, uri), ...], limits=limits, draft_size=(256, 256))
    nv = resolve_decoder("nvimgcodec", device="cuda:0")  # GpuDecoder(engine="nvimgcodec")
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import struct
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, features

from keeper_core.color import MatrixProfile, convert_to_srgb, srgb_matrix, srgb_transform
from keeper_core.errors import ConfigError, ImageDecodeError
from keeper_core.images import (
    _BAND_STEP,
    _DEFAULT_LIMITS,
    _JPEG_BARE,
    _SWAPPED_ORIENTATIONS,
    _TRANSPOSE,
    DecodeLimits,
    RawPreview,
    _check_draft_size,
    _display_orientation,
    _jpeg_frame_offset,
    _next_marker,
    _open,
    _sniff_format,
    check_header_size,
    check_jpeg_scans,
    decode_image,
    decode_image_alpha,
    raw_preview,
)

try:  # optional: keeper decodes with PIL alone when simplejpeg is not installed
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

if TYPE_CHECKING:
    import torch
    from PIL import ImageCms

__all__ = [
    "DECODERS",
    "DEVICE_DECODERS",
    "ENGINES",
    "Decoder",
    "GpuDecoder",
    "PilDecoder",
    "TurboDecoder",
    "resolve_decoder",
]

#: Names ``resolve_decoder`` (and ``--decode``) accept.
DECODERS = ("auto", "cpu", "pil", "turbo", "gpu", "nvimgcodec")
#: The libraries a :class:`GpuDecoder` decodes with on its device; the backend name of each.
ENGINES = {"torchvision": "gpu", "nvimgcodec": "nvimgcodec"}
#: The names that decode beside the model, on its CUDA device (a :class:`GpuDecoder`).
DEVICE_DECODERS = tuple(ENGINES.values())

log = logging.getLogger(__name__)

# SOF0-2: 8/12-bit Huffman baseline, extended and progressive (precision is checked apart).
# Arithmetic (SOF9-11), lossless (SOF3) and hierarchical (SOF5-7) JPEGs stay with PIL.
_TURBO_PROCESSES = frozenset((0xC0, 0xC1, 0xC2))
_TURBO_MODES = frozenset(("RGB", "L"))
_SOS, _EOI = 0xDA, b"\xff\xd9"
_TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"
# Pixels converted to sRGB in one call: a batch's images of one profile are joined up to this
# (int32 temporaries: ~16 bytes a pixel, ~270 MB here), a bigger image alone.
_CONVERT_PIXELS = 1 << 24


@runtime_checkable
class Decoder(Protocol):
    """Bytes in, an RGB ``PIL.Image`` out: exactly :func:`keeper_core.images.decode_image`
    (``decode_alpha``: and its alpha, exactly :func:`keeper_core.images.decode_image_alpha`)."""

    name: str

    def decode(
        self,
        data: bytes | RawPreview,
        *,
        limits: DecodeLimits | None = None,
        source: str | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> Image.Image:
        """Decode one image safely (see ``decode_image`` for arguments, result and errors)."""
        ...

    def decode_alpha(
        self,
        data: bytes | RawPreview,
        *,
        limits: DecodeLimits | None = None,
        source: str | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> tuple[Image.Image, Image.Image | None]:
        """:meth:`decode`, and the alpha composited into the image (``decode_image_alpha``)."""
        ...


class PilDecoder:
    """The reference backend: :func:`keeper_core.images.decode_image` (PIL's libjpeg)."""

    name = "pil"

    def decode(
        self,
        data: bytes | RawPreview,
        *,
        limits: DecodeLimits | None = None,
        source: str | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> Image.Image:
        """Decode one image safely; see :func:`keeper_core.images.decode_image`."""
        return decode_image(data, limits=limits, source=source, draft_size=draft_size)

    def decode_alpha(
        self,
        data: bytes | RawPreview,
        *,
        limits: DecodeLimits | None = None,
        source: str | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> tuple[Image.Image, Image.Image | None]:
        """:meth:`decode`, and its alpha: :func:`keeper_core.images.decode_image_alpha`."""
        return decode_image_alpha(data, limits=limits, source=source, draft_size=draft_size)


@dataclass(frozen=True)
class _Plan:
    """What the header says: decode ``jpeg`` here, or hand ``src`` to PIL for ``delegate``."""

    src: bytes | RawPreview  # what decode_image gets (a RAW's preview is extracted once)
    jpeg: bytes = b""  # the JPEG to decode (a RAW's preview)
    size: tuple[int, int] = (0, 0)  # stored (width, height)
    orientation: int = 1  # the one orientation to apply (the preview's own, else the RAW's)
    format: str = ""  # "JPEG" or "MPO"
    delegate: str | None = None  # why PIL decodes it, when it does
    transform: ImageCms.ImageCmsTransform | None = None  # to sRGB, as the reference converts
    matrix: MatrixProfile | None = None  # the same conversion in torch, for a matrix/TRC profile


def _plan(data: bytes | RawPreview, limits: DecodeLimits, source: str | None) -> _Plan:
    """Run decode_image's checks up to the header, and say who decodes the pixels.

    Raises:
        ImageDecodeError: for every input ``decode_image`` refuses before decoding pixels
            ("empty", "too_large", "not_image" and "unsupported" come from PIL's own path).
    """
    preview = (
        data if isinstance(data, RawPreview) else raw_preview(data, limits=limits, source=source)
    )
    src: bytes | RawPreview = data if preview is None else preview
    encoded, fallback = (data, 1) if preview is None else (preview.data, preview.orientation)
    raw_space = None if preview is None else preview.color_space
    assert isinstance(encoded, bytes | bytearray | memoryview)  # RawPreview was unwrapped
    fmt = _sniff_format(bytes(encoded[:32]))
    if fmt != "JPEG":  # no header of ours parsed yet: PIL does it all, once
        return _Plan(src=src, delegate=f"format:{fmt or 'unknown'}")
    encoded = bytes(encoded)
    im = _open(encoded, source, limits.max_bytes)
    w, h = im.size
    check_header_size(w, h, limits, source)  # decode_image's refusals, in its order
    check_jpeg_scans(encoded, limits, source)
    if im.mode not in _TURBO_MODES:
        return _Plan(src=src, delegate=f"mode:{im.mode}")
    transform = srgb_transform(im.info, im.mode, raw_space)  # the reference's conversion, if any
    matrix = None if transform is None else srgb_matrix(im.info, im.mode, raw_space)
    at = _jpeg_frame_offset(encoded)
    if at is None:  # PIL found a frame its own way: let it decode the same way too
        return _Plan(src=src, delegate="process:unknown")
    marker, precision = encoded[at + 1], encoded[at + 4]
    if marker not in _TURBO_PROCESSES or precision != 8:
        return _Plan(src=src, delegate=f"process:SOF{marker - 0xC0}/{precision}bit")
    orientation = _display_orientation(im, fallback)
    return _Plan(
        src=src,
        jpeg=encoded,
        size=(w, h),
        orientation=orientation,
        format=im.format or "JPEG",
        transform=transform,
        matrix=matrix,
    )


def _draft_scale(
    size: tuple[int, int], draft_size: tuple[int, int] | None, orientation: int
) -> int:
    """PIL's JPEG draft scale (1, 2, 4 or 8) for a stored ``size`` and a displayed request."""
    if draft_size is None:
        return 1
    tw, th = draft_size
    if orientation in _SWAPPED_ORIENTATIONS:  # draft_size is displayed, the DCT is stored
        tw, th = th, tw
    scale = min(size[0] // tw, size[1] // th)
    return next(s for s in (8, 4, 2, 1) if scale >= s or s == 1)


class TurboDecoder:
    """libjpeg-turbo (simplejpeg) for 8-bit Huffman JPEGs; PIL for everything else, counted.

    Attributes:
        decoded: images this backend decoded with libjpeg-turbo.
        color_converted: of those, images converted to sRGB from their colour space (littlecms,
            the reference's transform: the same pixels as ``decode_image``).
        delegated: images handed to :func:`decode_image`, by reason (see the module docstring).
            Counters are plain ints: one decoder per thread, or read them as approximate.
    """

    name = "turbo"

    def __init__(self) -> None:
        if simplejpeg is None:
            raise ConfigError("--decode turbo needs simplejpeg: pip install 'simplejpeg>=1.8'")
        self.decoded = 0
        self.color_converted = 0
        self.delegated: Counter[str] = Counter()

    def decode(
        self,
        data: bytes | RawPreview,
        *,
        limits: DecodeLimits | None = None,
        source: str | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> Image.Image:
        """Decode one image safely, with ``decode_image``'s arguments, result and errors."""
        return self.decode_alpha(data, limits=limits, source=source, draft_size=draft_size)[0]

    def decode_alpha(
        self,
        data: bytes | RawPreview,
        *,
        limits: DecodeLimits | None = None,
        source: str | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> tuple[Image.Image, Image.Image | None]:
        """:meth:`decode`, and the alpha PIL composited (a JPEG has none): ``decode_image_alpha``."""
        limits = _DEFAULT_LIMITS if limits is None else limits
        _check_draft_size(draft_size)
        plan = _plan(data, limits, source)
        if plan.delegate is not None:
            self.delegated[plan.delegate] += 1
            return decode_image_alpha(plan.src, limits=limits, source=source, draft_size=draft_size)
        scale = _draft_scale(plan.size, draft_size, plan.orientation)
        w, h = plan.size
        # simplejpeg picks the smallest libjpeg-turbo factor (n/8) meeting both minimums: with
        # PIL's ceil(side / scale) as the minimums, that is exactly 1/scale.
        mins = {"min_width": -(-w // scale), "min_height": -(-h // scale)} if scale > 1 else {}
        try:
            rgb = simplejpeg.decode_jpeg(plan.jpeg, colorspace="RGB", strict=True, **mins)
        except ValueError:
            # Not mapped to a reason here: "Premature end of JPEG file" is also what a complete
            # scan whose EOI is damaged gives, which PIL decodes. PIL's verdict is the contract
            # (its "truncated" for a cut file), at a second decode of a broken file only.
            self.delegated["turbo_refused"] += 1
            return decode_image_alpha(plan.src, limits=limits, source=source, draft_size=draft_size)
        self.decoded += 1
        out = Image.fromarray(rgb)
        if plan.transform is not None:  # per pixel: before or after the orientation, the same
            out = convert_to_srgb(out, plan.transform)
            self.color_converted += 1
        return out if plan.orientation == 1 else out.transpose(_TRANSPOSE[plan.orientation]), None


def _complete(jpeg: bytes) -> bool:
    """Whether an EOI marker follows the first scan (a truncated file has none).

    Inside entropy-coded data 0xFF is always stuffed (FF 00) or a restart marker, so an FF D9
    after the first SOS is an EOI, not data. One found before it (an EXIF thumbnail's) is not.
    The header is walked as ``images._jpeg_frame_offset`` walks it (junk skipped as libjpeg does).
    """
    i, n = 2, len(jpeg)
    while (i := _next_marker(jpeg, i)) >= 0 and i + 4 <= n:
        marker = jpeg[i + 1]
        if marker == _SOS:
            return jpeg.find(_EOI, i) != -1
        i += 2 if marker in _JPEG_BARE else 2 + struct.unpack_from(">H", jpeg, i + 2)[0]
    return False


def _orient(chw: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a (3, H, W) tensor, as ``images._TRANSPOSE`` does."""
    import torch

    if orientation in (5, 6, 7, 8):
        chw = chw.transpose(1, 2)  # 5: transpose; 6, 7, 8 are it plus a flip
    flips = {2: [2], 3: [1, 2], 4: [1], 5: [], 6: [2], 7: [1, 2], 8: [1]}.get(orientation, [])
    return torch.flip(chw, flips).contiguous() if flips else chw.contiguous()


def _unbanded(
    result: tuple[torch.Tensor, torch.Tensor | None] | ImageDecodeError,
) -> tuple[torch.Tensor, None, torch.Tensor | None] | ImageDecodeError:
    """A CPU decode's ``(pixels, alpha)`` as ``_decode_batch``'s ``(pixels, band, alpha)``."""
    return result if isinstance(result, ImageDecodeError) else (result[0], None, result[1])


def _by_pixels(images: list[torch.Tensor], limit: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of ``(3, H, W)`` images of at most ``limit`` pixels (or one image)."""
    group: list[torch.Tensor] = []
    pixels = 0
    for image in images:
        n = image[0].numel()
        if group and pixels + n > limit:
            yield group
            group, pixels = [], 0
        group.append(image)
        pixels += n
    if group:
        yield group


def _grey_band(chw: torch.Tensor, pixels: int) -> torch.Tensor:
    """PIL's "L" of the top rows ``decode_jpeg_band(pixels=pixels)`` decodes: (rows, W) uint8."""
    import torch

    height, width = chw.shape[1:]
    rows = max(64, -(-pixels // width))
    rows = min(height, -(-rows // _BAND_STEP) * _BAND_STEP)
    c = chw[:, :rows].to(torch.int32)
    return ((c[0] * 19595 + c[1] * 38470 + c[2] * 7471 + 0x8000) >> 16).to(torch.uint8)


class GpuDecoder:
    """A batch of JPEGs to tensors on a device: nvJPEG through torchvision, or nvImageCodec.

    Headers are checked on the CPU first (the same checks as ``decode_image``), so a bomb or a
    non-image never reaches the device. Non-JPEGs, CMYK and uncommon JPEG processes, MPO files,
    incomplete JPEGs and JPEGs with a LUT-based ICC profile go to the CPU backend by rule
    (``delegated``); a JPEG the device fails to decode goes to it too (``fallbacks``). A draft
    decode is a full decode, then a box downscale on the device by PIL's DCT draft scale, so
    every backend hands the model the same size. A JPEG tagged with a matrix/TRC profile (or
    EXIF's Adobe RGB, or a RAW preview's colour space from its RAW) is converted to sRGB on the
    device after that, a batch per profile (``color_converted``), as ``decode_image`` converts
    its draft.

    Args:
        device: a CUDA device ("cuda", "cuda:1"). ``"cpu"`` runs the engine's CPU decoder
            (torchvision's libjpeg, nvImageCodec's libjpeg-turbo backend): for tests of this
            class's control flow only, never a deployment choice.
        cpu: the backend for what the device does not decode (default: ``resolve_decoder("cpu")``).
        engine: the library that decodes on the device, one of :data:`ENGINES`: "torchvision"
            (``decode_jpeg(..., device=...)``, nvJPEG) or "nvimgcodec" (nvImageCodec: the GPU's
            hardware JPEG decoder where it has one, else its CUDA decoder).

    Raises:
        ConfigError: a CUDA device in a process that sees none, or another device type; an
            unknown engine; nvimgcodec not installed, or unable to decode a test JPEG on the
            device (its nvJPEG library missing, say): never a silent switch to the CPU.
    """

    def __init__(
        self, device: str = "cuda", *, cpu: Decoder | None = None, engine: str = "torchvision"
    ) -> None:
        import torch

        if engine not in ENGINES:
            raise ConfigError(f"unknown GPU decode engine {engine!r}: one of {', '.join(ENGINES)}")
        self.name = ENGINES[engine]
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"GpuDecoder device {device!r} is not a torch device: {e}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--decode {self.name} needs a CUDA device; this process sees none")
        if dev.type not in ("cuda", "cpu"):
            raise ConfigError(f"GpuDecoder decodes on CUDA (or CPU in tests), not {dev.type!r}")
        self.device = dev
        self._nvimgcodec = _NvImgCodec(dev) if engine == "nvimgcodec" else None
        self.cpu: Decoder = cpu if cpu is not None else resolve_decoder("cpu")
        self.decoded = 0
        self.color_converted = 0  # of ``decoded``: converted to sRGB on the device
        self.delegated: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()

    def decode_batch(
        self,
        items: Sequence[tuple[bytes | RawPreview, str | None]],
        *,
        limits: DecodeLimits | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> list[torch.Tensor | ImageDecodeError]:
        """Decode ``(data, source)`` pairs to uint8 ``(3, H, W)`` tensors on ``self.device``.

        Args:
            items: encoded images (or RAW previews) with where they came from (a URI or None).
            limits: as for ``decode_image``, checked on the CPU before anything is decoded.
            draft_size: displayed ``(width, height)`` the caller will resize to; a JPEG is
                returned at PIL's draft size for it (never smaller on either side).

        Returns:
            One entry per item, in order: the oriented RGB tensor, or the ImageDecodeError
            ``decode_image`` would raise for it.

        Raises:
            ConfigError: ``draft_size`` is not two positive ints.
        """
        results = self._decode_batch(items, limits, draft_size, None)
        return [r if isinstance(r, ImageDecodeError) else r[0] for r in results]

    def decode_batch_with_bands(
        self,
        items: Sequence[tuple[bytes | RawPreview, str | None]],
        *,
        limits: DecodeLimits | None = None,
        draft_size: tuple[int, int] | None = None,
        band_pixels: int,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | ImageDecodeError]:
        """:meth:`decode_batch`, plus the full-resolution top band of each drafted image, and
        the alpha of each image with transparency.

        A draft loses the 8x8 block grid blockiness is measured on. For a JPEG decoded and
        drafted on the device, the band is the top rows of the full decode before the shrink,
        in stored orientation, as PIL's "L" of its RGB: the rows
        :func:`keeper_core.images.decode_jpeg_band` decodes for ``pixels=band_pixels``, so no
        second decode is needed. None for an image not drafted, or decoded on the CPU (whose
        caller decodes its band there). The alpha is what the CPU backend composited on white
        (``decode_image_alpha``): only a delegated image (a PNG, WebP, TIFF...) can have one.

        Returns:
            Per item, in order: ``(pixels, band, alpha)`` (band: uint8 ``(rows, stored
            width)``, alpha: uint8 ``(H, W)``, each on ``self.device`` or None), or the
            ImageDecodeError ``decode_image`` would raise.
        """
        return self._decode_batch(items, limits, draft_size, band_pixels)

    def _decode_batch(
        self,
        items: Sequence[tuple[bytes | RawPreview, str | None]],
        limits: DecodeLimits | None,
        draft_size: tuple[int, int] | None,
        band_pixels: int | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | ImageDecodeError]:
        limits = _DEFAULT_LIMITS if limits is None else limits
        _check_draft_size(draft_size)
        out: list[
            tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | ImageDecodeError | None
        ] = [None] * len(items)
        on_device: list[tuple[int, _Plan]] = []
        for i, (data, source) in enumerate(items):
            try:
                plan = _plan(data, limits, source)
            except ImageDecodeError as e:
                out[i] = e
                continue
            reason = plan.delegate
            if reason is None and plan.transform is not None and plan.matrix is None:
                reason = "icc"  # a LUT-based profile: littlecms on the CPU converts it
            if reason is None and plan.format != "JPEG":
                reason = f"format:{plan.format}"  # nvJPEG would read the first picture only
            if reason is None and not _complete(plan.jpeg):
                reason = "incomplete"  # the CPU backends report truncation; nvJPEG may not
            if reason is None:
                on_device.append((i, plan))
            else:
                self.delegated[reason] += 1
                out[i] = _unbanded(self._on_cpu(plan.src, items[i][1], limits, draft_size))
        decoded = self._device_decode([p.jpeg for _, p in on_device])
        to_convert: dict[MatrixProfile, list[tuple[int, torch.Tensor, torch.Tensor | None]]] = {}
        for (i, plan), result in zip(on_device, decoded, strict=True):
            if isinstance(result, Exception):
                self.fallbacks[type(result).__name__] += 1
                out[i] = _unbanded(self._on_cpu(plan.src, items[i][1], limits, draft_size))
                continue
            self.decoded += 1
            scale = _draft_scale(plan.size, draft_size, plan.orientation)
            band = None
            if scale > 1:
                if band_pixels is not None:
                    band = _grey_band(result, band_pixels)
                result = self._shrink(result, scale)
            result = _orient(result, plan.orientation)
            if plan.matrix is None:
                out[i] = (result, band, None)  # a JPEG: no alpha
            else:  # converted below, with the batch's other images of this profile
                to_convert.setdefault(plan.matrix, []).append((i, result, band))
        for matrix, pending in to_convert.items():
            srgb = self._to_srgb([image for _, image, _ in pending], matrix)
            for (i, _, band), image in zip(pending, srgb, strict=True):
                out[i] = (image, band, None)
        assert all(r is not None for r in out)  # every item took exactly one of the paths
        return [r for r in out if r is not None]

    def _to_srgb(self, images: list[torch.Tensor], matrix: MatrixProfile) -> list[torch.Tensor]:
        """Decoded ``(3, H, W)`` images of one profile, converted to sRGB on their device.

        Joined into one ``(3, 1, pixels)`` tensor, up to ``_CONVERT_PIXELS`` at a time: a batch
        of one profile (an iPhone library: all of it) costs a few kernels, not a few per image.
        """
        import torch

        converted: list[torch.Tensor] = []
        for group in _by_pixels(images, _CONVERT_PIXELS):
            flat = torch.cat([image.reshape(3, 1, -1) for image in group], dim=2)
            parts = matrix.to_srgb(flat).split([image[0].numel() for image in group], dim=2)
            converted += [p.reshape(image.shape) for p, image in zip(parts, group, strict=True)]
        self.color_converted += len(images)
        return converted

    def decode(
        self,
        data: bytes | RawPreview,
        *,
        limits: DecodeLimits | None = None,
        source: str | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> Image.Image:
        """One image through :meth:`decode_batch`, back on the CPU as a PIL image.

        For the :class:`Decoder` interface only: the device pays off through ``decode_batch``,
        whose pixels stay on the device for the model.
        """
        return self.decode_alpha(data, limits=limits, source=source, draft_size=draft_size)[0]

    def decode_alpha(
        self,
        data: bytes | RawPreview,
        *,
        limits: DecodeLimits | None = None,
        source: str | None = None,
        draft_size: tuple[int, int] | None = None,
    ) -> tuple[Image.Image, Image.Image | None]:
        """:meth:`decode`, and the alpha the CPU backend composited (a JPEG has none)."""
        (result,) = self._decode_batch([(data, source)], limits, draft_size, None)
        if isinstance(result, ImageDecodeError):
            raise result
        pixels, _, alpha = result
        image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
        return image, None if alpha is None else Image.fromarray(alpha.cpu().numpy())

    def _device_decode(self, jpegs: list[bytes]) -> list[torch.Tensor | Exception]:
        """Decode on the device, a batch at once: per JPEG a ``(3, H, W)`` tensor or the error."""
        if not jpegs:
            return []
        if self._nvimgcodec is not None:
            return self._nvimgcodec.decode(jpegs)
        return self._torchvision_decode(jpegs)

    def _torchvision_decode(self, jpegs: list[bytes]) -> list[torch.Tensor | Exception]:
        """torchvision's batched call; one image at a time to find the failing one."""
        import torch

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION)
            from torchvision.io import ImageReadMode, decode_jpeg

            tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
            try:
                batch: list[torch.Tensor] = decode_jpeg(
                    tensors, mode=ImageReadMode.RGB, device=self.device
                )
                return list(batch)
            except RuntimeError:
                pass  # one bad image fails the batch: decode one at a time to find which
            results: list[torch.Tensor | Exception] = []
            for t in tensors:
                try:
                    results.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as e:
                    results.append(e)
            return results

    def _on_cpu(
        self,
        src: bytes | RawPreview,
        source: str | None,
        limits: DecodeLimits,
        draft_size: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | ImageDecodeError:
        """The CPU backend's pixels ``(3, H, W)`` and alpha ``(H, W)`` (or None), on the device."""
        import torch

        try:
            img, alpha = self.cpu.decode_alpha(
                src, limits=limits, source=source, draft_size=draft_size
            )
        except ImageDecodeError as e:
            return e
        chw = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        if alpha is None:
            return chw.to(self.device), None
        return chw.to(self.device), torch.from_numpy(np.array(alpha, dtype=np.uint8)).to(
            self.device
        )

    @staticmethod
    def _shrink(chw: torch.Tensor, scale: int) -> torch.Tensor:
        """Downscale a stored-orientation image as a DCT draft does: ceil(side / scale) pixels.

        Output pixel i covers source pixels [scale * i, scale * (i + 1)), the last one only the
        pixels that exist (ceil_mode), like libjpeg's scaled IDCT of edge blocks; an area resize
        to the same size would spread the remainder over the whole row and shift the image.
        """
        import torch

        small = torch.nn.functional.avg_pool2d(chw[None].float(), scale, ceil_mode=True)
        return small[0].round_().clamp_(0, 255).to(torch.uint8)


_NV_IMPORT_LOCK = threading.Lock()
#: Lines nvImageCodec prints when it loads its extensions and finds no library for codecs keeper
#: does not use (JPEG 2000, TIFF on the GPU): expected, logged at debug level.
_NV_EXPECTED = ("nvjpeg2k", "nvJPEG2000", "nvtiff", "nvTIFF")


@contextlib.contextmanager
def _c_output_to_log() -> Iterator[None]:
    """Route what C code prints meanwhile (fds 1 and 2) into this module's log.

    nvImageCodec loads its codec extensions when it is imported, and each one whose CUDA library
    is not installed prints a paragraph (C ``printf``, beyond Python's reach, and buffered by C's
    stdio until the process exits when stdout is not a terminal). The lines are kept: at debug
    level when they are about a codec keeper does not use, else at warning level. What another
    thread prints in that moment (an import's milliseconds) lands in the log too.
    """
    import ctypes
    import sys

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in saved:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            libc.fflush(None)  # C's buffered stdout, while it still points at the sink
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    expected = any(k in line for k in _NV_EXPECTED) or line.startswith("Note:")
                    log.log(logging.DEBUG if expected else logging.WARNING, "nvimgcodec: %s", line)


def _import_nvimgcodec() -> Any:
    """``nvidia.nvimgcodec``, imported once per process with its load-time chatter logged.

    Raises:
        ConfigError: it is not installed.
    """
    import sys

    with _NV_IMPORT_LOCK:
        loaded = sys.modules.get("nvidia.nvimgcodec")
        if loaded is not None:
            return loaded
        # Read at import: errors per image are not for the terminal (GpuDecoder counts them).
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
        try:
            with _c_output_to_log():  # it loads its codec extensions as it is imported
                return importlib.import_module("nvidia.nvimgcodec")
        except ImportError as e:
            raise ConfigError(
                "--decode nvimgcodec needs NVIDIA nvImageCodec: pip install "
                "'keeper-core[nvimgcodec]' (nvidia-nvimgcodec-cu13[nvjpeg]; the -cu12 package "
                "for a CUDA 12 build of torch)"
            ) from e


class _NvImgCodec:
    """nvImageCodec's batch decoder on one device, to RGB uint8 ``(3, H, W)`` tensors there.

    On CUDA its GPU backends (the hardware JPEG decoder, then the CUDA and hybrid nvJPEG
    decoders); on the CPU (tests) its libjpeg-turbo backend. EXIF orientation is not applied
    here (``GpuDecoder`` applies the one ``decode_image`` would); greyscale comes out as RGB.
    A JPEG it cannot decode comes back as None, reported as a RuntimeError for the caller to
    decode on the CPU and count.
    """

    def __init__(self, device: torch.device) -> None:
        import torch

        nvimgcodec = _import_nvimgcodec()
        self.nv = nvimgcodec
        self.device = device
        if device.type == "cuda":
            device_id = device.index if device.index is not None else torch.cuda.current_device()
            kinds = [
                nvimgcodec.BackendKind.HW_GPU_ONLY,
                nvimgcodec.BackendKind.GPU_ONLY,
                nvimgcodec.BackendKind.HYBRID_CPU_GPU,
            ]
        else:
            device_id, kinds = (
                nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                [nvimgcodec.BackendKind.CPU_ONLY],
            )
        self.decoder = nvimgcodec.Decoder(
            device_id=device_id, backends=[nvimgcodec.Backend(k) for k in kinds]
        )
        self.params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            allow_any_depth=False,
            sample_format=nvimgcodec.SampleFormat.I_RGB,
        )
        (probe,) = self.decode([_probe_jpeg()])
        if isinstance(probe, Exception):
            where = "its CPU backend" if device.type == "cpu" else f"{device}"
            raise ConfigError(
                f"nvImageCodec could not decode a test JPEG on {where}: no decoder for it loaded "
                "(on a GPU its nvJPEG library: pip install nvidia-nvjpeg, or the CUDA toolkit's)"
            )

    def decode(self, jpegs: list[bytes]) -> list[torch.Tensor | Exception]:
        import torch

        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device).cuda_stream if cuda else 0
        images: list[Any]
        try:
            images = self.decoder.decode(jpegs, params=self.params, cuda_stream=stream)
        except RuntimeError:  # the batch as a whole failed: one at a time, to find which
            images = []
            for jpeg in jpegs:
                try:
                    images.append(self.decoder.decode(jpeg, params=self.params, cuda_stream=stream))
                except RuntimeError as e:
                    images.append(e)
        out: list[torch.Tensor | Exception] = []
        for image in images:
            if image is None or isinstance(image, Exception):
                out.append(image or RuntimeError("nvImageCodec could not decode it"))
                continue
            if image.buffer_kind == self.nv.ImageBufferKind.STRIDED_DEVICE:
                hwc = torch.from_dlpack(image)  # on the consumer's (torch's current) stream
            else:  # a host buffer: the CPU backend; copied out of nvImageCodec's buffer
                hwc = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
            out.append(hwc.permute(2, 0, 1).to(self.device))
        return out


@functools.cache
def _probe_jpeg() -> bytes:
    """A small JPEG every working decoder decodes: a backend's self-test at construction."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 120, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _pillow_jpeg_is_turbo() -> bool:
    """Whether Pillow's own JPEG codec is libjpeg-turbo (then it decodes as fast as turbo)."""
    return bool(features.check_feature("libjpeg_turbo"))


def _is_cuda(device: str | None) -> bool:
    if device is None:
        return False
    import torch

    try:
        return torch.device(device).type == "cuda" and torch.cuda.is_available()
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device: {e}") from e


def resolve_decoder(name: str, *, device: str | None = None) -> Decoder:
    """The decode backend a ``--decode`` name selects.

    Args:
        name: one of :data:`DECODERS`. "cpu": pil when Pillow decodes JPEG with
            libjpeg-turbo (measured as fast as turbo), else turbo when simplejpeg is installed.
            "auto": gpu when ``device`` is a CUDA device this process sees (decode beside the
            model), else cpu. "gpu": a :class:`GpuDecoder` on ``device`` (default "cuda");
            "nvimgcodec": the same with ``engine="nvimgcodec"``.
        device: where the model runs ("cuda:0", "cpu"); None when nothing says.

    Raises:
        ConfigError: an unknown name; "gpu" or "nvimgcodec" without a CUDA device (or with a
            non-CUDA ``device``); "turbo" without simplejpeg; "nvimgcodec" not installed.
    """
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}: choose one of {', '.join(DECODERS)}")
    if name == "auto":
        name = "gpu" if _is_cuda(device) else "cpu"
    if name == "cpu":
        name = "pil" if simplejpeg is None or _pillow_jpeg_is_turbo() else "turbo"
    if name == "pil":
        return PilDecoder()
    if name == "turbo":
        return TurboDecoder()
    if device is not None and not device.startswith("cuda"):
        raise ConfigError(
            f"--decode {name} decodes on the model's CUDA device, got device {device!r} "
            "(GpuDecoder(device='cpu') exists for tests only)"
        )
    engine = next(e for e, n in ENGINES.items() if n == name)
    return GpuDecoder(device or "cuda", engine=engine)  # ConfigError when no CUDA is seen
