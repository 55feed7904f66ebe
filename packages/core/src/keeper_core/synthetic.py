"""A best-of-series benchmark corpus built from real photos that ship with scikit-image.

Each series imitates a handheld burst: one crop window of a base photo, a small shift per
shot, and exactly one clean shot (the keeper, at a random position). Every other shot gets one
or two degradations, each at a severity drawn uniformly from a range that spans subtle to
obvious, so no single rule (say, "pick the sharpest") solves the task:

| degradation | parameter (in the manifest) | range |
| --- | --- | --- |
| defocus | Gaussian blur sigma, px at output size | 0.6 - 3.0 |
| motion | line kernel length, px @ angle, degrees | 3 - 15 @ 0 - 180 |
| underexpose | gain on sRGB values | 0.35 - 0.8 |
| overexpose | gain on sRGB values, clipped at 255 | 1.3 - 2.2 |
| noise | read-noise sigma on 0..255 (+ shot noise of similar size at mid-grey) | 3 - 25 |
| jpeg | re-encode quality | 5 - 20 |
| haze | blend weight toward a light airlight (low contrast) | 0.15 - 0.6 |

Degradations are applied in capture order (optics, exposure, atmosphere, sensor, codec),
whatever order they were drawn in. Every series draws from ``np.random.default_rng([seed,
index])``, so a series is the same whatever ``n_series`` is, and the same arguments give
byte-identical images and manifest.

``render_series`` (one burst) and ``load_photos`` are public: ``keeper_core.synthetic_library``
builds a camera-card photo library out of the same bursts.

Base photos: 17 real photos that ship inside scikit-image (``PHOTOS``; 9 are greyscale and
become grey RGB), one per series, round-robin. The default is the six colour photos the corpus
started with (``DEFAULT_PHOTOS``); a split that holds whole photos out of training needs more,
so pass ``photos=PHOTOS`` (``--photos all``).

Run it (scikit-image is a demo/dev dependency: ``pip install 'keeper-core[demo]'``):

    python -m keeper_core.synthetic --out data/synth --series 150 --seed 0 --size 320x240
    python -m keeper_core.synthetic --out data/synth17 --series 660 --photos all
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from keeper_core.errors import ConfigError, KeeperError

#: Real photos inside scikit-image's wheel, usable as base photos (none is downloaded). Left
#: out: drawings and synthetic images (logo, colorwheel, horse, phantom, chessboards), the
#: already motion-blurred clock_motion, thumbnails (lfw faces, microaneurysms) and the right
#: view of the stereo motorcycle (the left one, 5 cm away, would leak across a by-photo split).
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle",
    "camera",  # greyscale from here on, converted to RGB
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "page",
    "text",
    "cell",
)
#: The default base photos: the six colour photos the corpus was first built from, so a
#: corpus generated with default arguments stays the same as before the others were added.
DEFAULT_PHOTOS: tuple[str, ...] = PHOTOS[:6]
#: Degradation kinds, in the order they are applied.
DEGRADATIONS: tuple[str, ...] = (
    "defocus",
    "motion",
    "underexpose",
    "overexpose",
    "haze",
    "noise",
    "jpeg",
)
MANIFEST_COLUMNS: tuple[str, ...] = (
    "series_id",
    "image_uri",
    "is_best",
    "base_photo",
    "degradation",
)

_SHIFT = 0.03  # max per-shot shift, as a fraction of the crop side: a steady handheld burst
_AREA = (0.5, 0.9)  # crop area as a fraction of the photo's area
_EXCLUSIVE = {frozenset({"underexpose", "overexpose"})}  # one exposure error per shot


def generate_corpus(
    out_dir: str | Path,
    *,
    n_series: int,
    seed: int = 0,
    min_shots: int = 2,
    max_shots: int = 5,
    image_size: tuple[int, int] = (320, 240),
    photos: Sequence[str] | None = None,
    jpeg_quality: int = 92,
) -> Path:
    """Write a synthetic best-of-series corpus and its manifest.

    Args:
        out_dir: folder to write into (created). Images go to
            ``out_dir/images/<series_id>/<shot>.jpg``, the manifest to ``out_dir/manifest.csv``.
        n_series: number of series (>= 1).
        seed: seed of the whole corpus; series ``i`` draws from ``default_rng([seed, i])``.
        min_shots: fewest shots per series (>= 2).
        max_shots: most shots per series (>= min_shots).
        image_size: ``(width, height)`` of every shot, each side >= 16.
        photos: base photo names from ``PHOTOS``, used round-robin; default
            ``DEFAULT_PHOTOS``.
        jpeg_quality: quality every shot is saved at (1-95).

    Returns:
        The manifest path. Its columns are ``MANIFEST_COLUMNS``: ``image_uri`` is an absolute
        path, ``is_best`` is 1 for the clean keeper of each series and 0 otherwise,
        ``degradation`` is ``"none"`` or e.g. ``"defocus:1.8+noise:12"``.

    Raises:
        ConfigError: an argument is invalid (named; an ``out_dir`` that is, or lies under, a
            file among them), or scikit-image is not installed.
    """
    if n_series < 1:
        raise ConfigError(f"n_series must be >= 1, got {n_series}")
    if min_shots < 2:
        raise ConfigError(f"min_shots must be >= 2 (a series needs a choice), got {min_shots}")
    if max_shots < min_shots:
        raise ConfigError(f"max_shots must be >= min_shots ({min_shots}), got {max_shots}")
    if len(image_size) != 2 or min(image_size) < 16:
        raise ConfigError(f"image_size must be (width, height) with sides >= 16, got {image_size}")
    if not 1 <= jpeg_quality <= 95:
        raise ConfigError(f"jpeg_quality must be in 1..95, got {jpeg_quality}")
    names = tuple(DEFAULT_PHOTOS if photos is None else photos)
    unknown = sorted(set(names) - set(PHOTOS))
    if not names or unknown:
        raise ConfigError(f"photos must be a non-empty subset of {PHOTOS}, unknown: {unknown}")
    out = Path(out_dir).resolve()
    there = next(p for p in (out, *out.parents) if p.exists())  # the root always exists
    if not there.is_dir():
        raise ConfigError(f"out_dir must be a folder, but {there} is a file")

    base = load_photos(names)
    rows: list[tuple[str, str, int, str, str]] = []
    for index in range(n_series):
        series_id = f"s{index:05d}"
        name = names[index % len(names)]
        folder = out / "images" / series_id
        folder.mkdir(parents=True, exist_ok=True)
        shots = render_series(
            base[name],
            np.random.default_rng([seed, index]),
            min_shots=min_shots,
            max_shots=max_shots,
            size=image_size,
        )
        for shot, (img, degradation) in enumerate(shots):
            path = folder / f"{shot:02d}.jpg"
            img.save(path, "JPEG", quality=jpeg_quality)
            rows.append((series_id, str(path), int(degradation == "none"), name, degradation))

    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    return manifest


def load_photos(names: Sequence[str]) -> dict[str, Image.Image]:
    """The named base photos (from ``PHOTOS``) as RGB images, read from scikit-image's wheel.

    Raises:
        ConfigError: scikit-image is not installed.
    """
    try:
        from skimage import data
    except ImportError as e:
        raise ConfigError(
            "generate_corpus needs scikit-image for its base photos: "
            "pip install 'keeper-core[demo]' (or scikit-image)"
        ) from e

    def load(name: str) -> np.ndarray:
        if name == "motorcycle":
            return data.stereo_motorcycle()[0]  # (left, right, disparity): the left view
        return getattr(data, name)()

    return {name: Image.fromarray(load(name)).convert("RGB") for name in set(names)}


def render_series(
    photo: Image.Image,
    rng: np.random.Generator,
    *,
    min_shots: int,
    max_shots: int,
    size: tuple[int, int],
    area: tuple[float, float] = _AREA,
) -> list[tuple[Image.Image, str]]:
    """Renders one burst of ``photo``: the shots in capture order with their degradation labels.

    One crop window (``area`` of the photo, the output's aspect), a small shift per shot, one
    clean shot at a random position (label ``"none"``) and one or two degradations on every
    other shot. ``min_shots=max_shots=1`` renders a single clean shot. Everything is drawn
    from ``rng``, in a fixed order, so the same generator state gives the same pixels.

    Args:
        photo: the base photo (RGB).
        rng: the series' generator; ``generate_corpus`` uses ``default_rng([seed, index])``.
        min_shots: fewest shots (>= 1; not checked here).
        max_shots: most shots (>= min_shots).
        size: ``(width, height)`` of every shot.
        area: the range the crop window's share of the photo's area is drawn from.
    """
    n = int(rng.integers(min_shots, max_shots + 1))
    keeper = int(rng.integers(n))

    # A crop window with the output's aspect, covering `area` of the photo, shrunk if needed
    # so the window plus the largest shift on either side still fits inside the photo.
    W, H = photo.size
    aspect = size[0] / size[1]
    ch = np.sqrt(rng.uniform(*area) * W * H / aspect)
    cw = ch * aspect
    fit = min(1.0, W / (cw * (1 + 2 * _SHIFT)), H / (ch * (1 + 2 * _SHIFT)))
    cw, ch = cw * fit, ch * fit
    sx, sy = _SHIFT * cw, _SHIFT * ch
    # max(0, ...): when the fit binds, the free room is 0 up to float rounding.
    x0 = sx + rng.uniform() * max(0.0, W - cw - 2 * sx)
    y0 = sy + rng.uniform() * max(0.0, H - ch - 2 * sy)

    shots = []
    for i in range(n):
        dx, dy = rng.uniform(-1, 1, size=2) * (sx, sy)
        box = (x0 + dx, y0 + dy, x0 + dx + cw, y0 + dy + ch)
        img = photo.resize(size, Image.Resampling.BICUBIC, box=box)
        shots.append((img, "none") if i == keeper else _degrade(img, rng))
    return shots


def _degrade(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Apply one or two distinct degradations at random severities."""
    while True:
        kinds = set(rng.choice(DEGRADATIONS, size=int(rng.integers(1, 3)), replace=False).tolist())
        if not any(pair <= kinds for pair in _EXCLUSIVE):
            break
    labels = []
    for kind in DEGRADATIONS:  # capture order, not draw order
        if kind in kinds:
            img, label = _APPLY[kind](img, rng)
            labels.append(f"{kind}:{label}")
    return img, "+".join(labels)


def _defocus(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    sigma = round(float(rng.uniform(0.6, 3.0)), 1)
    return img.filter(ImageFilter.GaussianBlur(sigma)), f"{sigma:g}"


def _motion(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    length = round(float(rng.uniform(3.0, 15.0)), 1)
    angle = int(rng.integers(0, 180))
    # Rasterise a line segment through the kernel centre by sampling it densely and splatting
    # each sample bilinearly: an anti-aliased, normalised line kernel at any angle.
    r = int(np.ceil(length / 2)) + 1
    kernel = np.zeros((2 * r + 1, 2 * r + 1))
    t = np.linspace(-length / 2, length / 2, int(length * 4) + 1)
    xs = r + t * np.cos(np.deg2rad(angle))
    ys = r - t * np.sin(np.deg2rad(angle))
    x_lo, y_lo = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x_lo, ys - y_lo
    for ox, oy, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        np.add.at(kernel, (y_lo + oy, x_lo + ox), w)
    kernel /= kernel.sum()

    # Convolution as a sum of shifted copies: the kernel has ~2*length taps, so this beats an
    # FFT at these sizes and needs no scipy.
    arr = np.asarray(img, dtype=np.float32)
    h, w = arr.shape[:2]
    padded = np.pad(arr, ((r, r), (r, r), (0, 0)), mode="edge")
    out = np.zeros_like(arr)
    for ky, kx in zip(*np.nonzero(kernel), strict=True):
        out += kernel[ky, kx] * padded[ky : ky + h, kx : kx + w]
    return _to_image(out), f"{length:g}@{angle}"


def _underexpose(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    gain = round(float(rng.uniform(0.35, 0.8)), 2)
    return _to_image(np.asarray(img, dtype=np.float32) * gain), f"{gain:g}"


def _overexpose(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    gain = round(float(rng.uniform(1.3, 2.2)), 2)
    return _to_image(np.asarray(img, dtype=np.float32) * gain), f"{gain:g}"  # clips highlights


def _haze(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    # Koschmieder's model I = J t + A (1 - t) with a uniform transmission: contrast drops and
    # the blacks lift toward a light, slightly warm or cool grey airlight A.
    weight = round(float(rng.uniform(0.15, 0.6)), 2)
    airlight = rng.uniform(170.0, 230.0) + rng.uniform(-10.0, 10.0, size=3)
    arr = np.asarray(img, dtype=np.float32)
    return _to_image(arr * (1 - weight) + airlight * weight), f"{weight:g}"


def _noise(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    sigma = round(float(rng.uniform(3.0, 25.0)), 1)
    arr = np.asarray(img, dtype=np.float32)
    # Read noise (constant) plus shot noise (variance proportional to the signal), scaled so
    # both are ~sigma at mid-grey; per channel, so it shows as chroma noise too.
    std = np.sqrt((0.6 * sigma) ** 2 + (0.8 * sigma) ** 2 * arr / 128.0)
    return _to_image(arr + std * rng.standard_normal(arr.shape, dtype=np.float32)), f"{sigma:g}"


def _jpeg(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str]:
    quality = int(rng.integers(5, 21))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB"), str(quality)


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


_APPLY: dict[str, Callable[[Image.Image, np.random.Generator], tuple[Image.Image, str]]] = {
    "defocus": _defocus,
    "motion": _motion,
    "underexpose": _underexpose,
    "overexpose": _overexpose,
    "haze": _haze,
    "noise": _noise,
    "jpeg": _jpeg,
}


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (e.g. ``320x240``) as ``(width, height)``: an argparse ``type=``.

    Raises:
        argparse.ArgumentTypeError: not two integers joined by ``x``.
    """
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 320x240, got {text!r}") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    """Command line: generate a corpus and print the manifest path."""
    parser = argparse.ArgumentParser(
        prog="python -m keeper_core.synthetic",
        description="Generate a synthetic best-of-series corpus from scikit-image photos.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--series", required=True, type=int, help="number of series")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-shots", type=int, default=2)
    parser.add_argument("--max-shots", type=int, default=5)
    parser.add_argument("--size", type=parse_size, default=(320, 240), help="WxH, e.g. 320x240")
    parser.add_argument(
        "--photos",
        nargs="+",
        choices=[*PHOTOS, "all"],
        help=f"base photos, or 'all' (default: {' '.join(DEFAULT_PHOTOS)})",
    )
    parser.add_argument("--jpeg-quality", type=int, default=92)
    args = parser.parse_args(argv)
    try:
        manifest = generate_corpus(
            args.out,
            n_series=args.series,
            seed=args.seed,
            min_shots=args.min_shots,
            max_shots=args.max_shots,
            image_size=args.size,
            photos=PHOTOS if args.photos and "all" in args.photos else args.photos,
            jpeg_quality=args.jpeg_quality,
        )
    except KeeperError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
