"""A generated photo library as it comes off camera cards, with the truth to measure culling.

``generate_library`` writes what ``keeper pick`` meets in practice: JPEGs named and foldered the
way cameras name them (``DCIM/100CANON/IMG_0001.JPG``, ``DCIM/100NIKON/DSC_0001.JPG``), with EXIF
capture times, shot in bursts by two (or more) cameras through one day, plus duplicates. Each
burst is a series from ``keeper_core.synthetic.render_series`` (one crop of a real photo, small
shifts, one clean shot and degraded ones), so the truth is known: ``library.csv`` names every
file's true burst and its best shot.

Timeline (seconds; one true clock, cameras' clocks read it with an offset):

| what | how |
| --- | --- |
| shots in a burst | 2-8 at 5-15 frames/s (per burst), each interval jittered by N(0, 3 ms) |
| pause inside a burst | a quarter of bursts of >= 3 shots: the shutter re-pressed after 0.4-1.5 s |
| gap between scenes | 2 s + exponential (mean 90 s), from one scene's last shot to the next's first |
| cameras | each scene is shot by one camera, drawn at random, so cameras interleave in time |
| camera clocks | camera 0 is right; each other is off by a constant 1-60 min, either way |

A single shot (``singles_fraction`` of the series) is its own series with one clean shot.
Consecutive scenes never share a base photo (nor does a scene share one with the latest scene
of any camera), so a scene change is a change of picture, not just of crop. A photo does come
back in later scenes (there are 17), so each scene first takes its own view of it: a random
window of 50-100% of the photo's area, mirrored half the time. Without it, photos whose shape
leaves the renderer's crop no room (``page``, ``text``) came back as near-identical frames
minutes apart, which no embedding can tell from a duplicate.

EXIF (``PIL.Image.Exif``): Make, Model, DateTime, and in the Exif IFD DateTimeOriginal,
SubSecTimeOriginal, BodySerialNumber and, for cameras 0 and 2 only, OffsetTimeOriginal
(``+02:00``; the day is shot at UTC+2). Camera 0 writes sub-seconds as 2 digits (centiseconds),
camera 1 as 3 (milliseconds), as real bodies differ; recorded times are truncated to that
resolution. Every file's mtime is its capture instant: the camera's clock reading taken at
UTC+2 (what a card copied with times preserved shows).

Optional extras:

- ``mtime_only_fraction`` of the series have no EXIF time at all (Make/Model/serial kept): only
  their mtime tells when they were shot.
- ``exact_duplicates`` byte copies of random shots in ``export/100CANON/`` and so on (same
  name, another folder).
- ``near_duplicates`` re-encodes of other random shots in ``export/web/100CANON/`` (``.jpg``):
  resized to 50-90%,
  JPEG quality 60-85, EXIF stripped. Exports are written an hour after the last shot, 1 s apart
  (their mtime), like a batch export.

``library.csv`` columns (``LIBRARY_COLUMNS``): ``image_uri`` (absolute path), ``series_id`` (the
true burst; a copy has its source's), ``is_best`` (1 for each series' clean shot, never for a
copy), ``camera`` (the body that shot it, also for a copy without EXIF), ``capture_time`` (ISO
8601: the EXIF time with its offset when written, naive without; for a file without EXIF time
its mtime in UTC), ``degradation`` (as in ``keeper_core.synthetic``, plus ``+reencode:Q@SCALE``
for a near duplicate), ``duplicate_of`` (the source's ``image_uri`` for a copy, else empty),
``base_photo`` (the scikit-image photo the scene shows).
Score a grouping on the rows with an empty ``duplicate_of``; copies are for duplicate marking.

Same arguments -> byte-identical files, mtimes and manifest. Run it (scikit-image needed):

    python -m keeper_core.synthetic_library --out data/library --bursts 1200 \
        --exact-duplicates 40 --near-duplicates 40 --mtime-only 0.05
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from keeper_core.errors import ConfigError, KeeperError
from keeper_core.synthetic import PHOTOS, load_photos, render_series

LIBRARY_COLUMNS: tuple[str, ...] = (
    "image_uri",
    "series_id",
    "is_best",
    "camera",
    "capture_time",
    "degradation",
    "duplicate_of",
    "base_photo",
)


@dataclass(frozen=True)
class _Camera:
    make: str
    model: str
    serial: str
    folder: str  # DCIM/<100..999><folder>
    prefix: str  # file name before the number
    digits: int  # of the file number
    subsec_digits: int  # of SubSecTimeOriginal
    writes_offset: bool  # OffsetTimeOriginal present


_CAMERAS: tuple[_Camera, ...] = (
    _Camera("Canon", "Canon EOS R6", "032021001234", "CANON", "IMG_", 4, 2, True),
    _Camera("NIKON CORPORATION", "NIKON Z 6_2", "6012345", "NIKON", "DSC_", 4, 3, False),
    _Camera("SONY", "ILCE-7M3", "4512345", "MSDCF", "DSC", 5, 3, True),
    _Camera("FUJIFILM", "X-T4", "1AB23456", "_FUJI", "DSCF", 4, 2, False),
)

_ZONE = timezone(timedelta(hours=2))  # the shoot's local time zone
_DAY_START = datetime(2023, 6, 17, 9, 0, 0)  # local, naive: the first scene starts here
_BURST_SHOTS = (2, 8)
_FPS = (5.0, 15.0)
_JITTER_S = 0.003
_PAUSE_P, _PAUSE_S = 0.25, (0.4, 1.5)
_SCENE_GAP_MIN_S, _SCENE_GAP_MEAN_S = 2.0, 90.0
_CLOCK_OFFSET_S = (60.0, 3600.0)
_EXPORT_DELAY_S, _EXPORT_STEP_S = 3600.0, 1.0
_NEAR_SCALE, _NEAR_QUALITY = (0.5, 0.9), (60, 85)
_VIEW_AREA, _MIRROR_P = (0.5, 1.0), 0.5
_JPEG_QUALITY = 92

# EXIF tags (IFD0, then the Exif IFD).
_MAKE, _MODEL, _DATETIME, _EXIF_IFD = 0x010F, 0x0110, 0x0132, 0x8769
_DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL, _BODY_SERIAL = (
    0x9003,
    0x9011,
    0x9291,
    0xA431,
)


@dataclass
class _Shot:
    path: Path
    series_id: str
    is_best: bool
    camera: int
    clock: datetime  # the camera clock's reading, truncated to its sub-second resolution
    exif_time: bool
    degradation: str
    base_photo: str

    @property
    def instant(self) -> datetime:
        return self.clock.replace(tzinfo=_ZONE)

    def capture_time(self) -> str:
        if not self.exif_time:
            return _iso_utc(self.instant)
        text = self.clock.isoformat(timespec="milliseconds")
        return text + "+02:00" if _CAMERAS[self.camera].writes_offset else text


def generate_library(
    out_dir: str | Path,
    *,
    n_bursts: int,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 240),
    cameras: int = 2,
    singles_fraction: float = 0.15,
    exact_duplicates: int = 0,
    near_duplicates: int = 0,
    mtime_only_fraction: float = 0.0,
    photos: Sequence[str] | None = None,
) -> Path:
    """Writes a synthetic photo library and its truth manifest ``library.csv``.

    Args:
        out_dir: folder to write into (created): ``DCIM/<NNN><MAKER>/`` per camera, ``export/``
            for copies, ``library.csv``.
        n_bursts: number of series (scenes), single shots included (>= 1).
        seed: seed of the whole library.
        image_size: ``(width, height)`` of every camera shot, each side >= 16.
        cameras: number of camera bodies, 1-4.
        singles_fraction: fraction of the series that are one shot (rounded to a count).
        exact_duplicates: byte copies to add (<= n_bursts together with near_duplicates).
        near_duplicates: resized, re-encoded copies without EXIF to add.
        mtime_only_fraction: fraction of the series written without EXIF time (rounded).
        photos: base photo names from ``keeper_core.synthetic.PHOTOS``; default all of them.
            Needs more names than ``cameras`` (consecutive scenes use different photos).

    Returns:
        The manifest path (columns ``LIBRARY_COLUMNS``).

    Raises:
        ConfigError: an argument is invalid (named), or scikit-image is not installed.
    """
    names = tuple(PHOTOS if photos is None else photos)
    _validate(
        n_bursts,
        image_size,
        cameras,
        singles_fraction,
        exact_duplicates,
        near_duplicates,
        mtime_only_fraction,
        names,
    )
    base = load_photos(names)
    out = Path(out_dir).resolve()
    plan = np.random.default_rng([seed, 1])

    singles = set(plan.choice(n_bursts, round(singles_fraction * n_bursts), replace=False).tolist())
    no_exif = set(
        plan.choice(n_bursts, round(mtime_only_fraction * n_bursts), replace=False).tolist()
    )
    offsets = [0.0] + [
        float(plan.choice([-1.0, 1.0]) * round(plan.uniform(*_CLOCK_OFFSET_S), 3))
        for _ in range(cameras - 1)
    ]

    shots: list[_Shot] = []
    counters = [0] * cameras
    last_photo: dict[int, str] = {}
    t_end = 0.0  # true time of the latest shot, seconds after _DAY_START
    for index in range(n_bursts):
        cam = int(plan.integers(cameras))
        choices = [name for name in names if name not in last_photo.values()]
        name = choices[int(plan.integers(len(choices)))]
        last_photo[cam] = name
        lo, hi = (1, 1) if index in singles else _BURST_SHOTS
        rendered = render_series(
            _scene_view(base[name], plan),
            np.random.default_rng([seed, 2, index]),
            min_shots=lo,
            max_shots=hi,
            size=image_size,
        )
        start = t_end + (_SCENE_GAP_MIN_S + plan.exponential(_SCENE_GAP_MEAN_S) if index else 0.0)
        times = start + _burst_offsets(len(rendered), plan)
        t_end = float(times[-1])
        for (img, degradation), t in zip(rendered, times, strict=True):
            counters[cam] += 1
            shot = _Shot(
                path=out / _camera_path(cam, counters[cam]),
                series_id=f"b{index:05d}",
                is_best=degradation == "none",
                camera=cam,
                clock=_clock(float(t) + offsets[cam], _CAMERAS[cam].subsec_digits),
                exif_time=index not in no_exif,
                degradation=degradation,
                base_photo=name,
            )
            shot.path.parent.mkdir(parents=True, exist_ok=True)
            img.save(shot.path, "JPEG", quality=_JPEG_QUALITY, exif=_exif(shot))
            _set_mtime(shot.path, shot.instant)
            shots.append(shot)

    rows = [_row(s, s.capture_time(), s.degradation, "") for s in shots]
    rows += _write_copies(out, shots, seed, exact_duplicates, near_duplicates, t_end)
    manifest = out / "library.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(LIBRARY_COLUMNS)
        writer.writerows(rows)
    return manifest


def _validate(
    n_bursts: int,
    image_size: tuple[int, int],
    cameras: int,
    singles_fraction: float,
    exact_duplicates: int,
    near_duplicates: int,
    mtime_only_fraction: float,
    names: tuple[str, ...],
) -> None:
    if n_bursts < 1:
        raise ConfigError(f"n_bursts must be >= 1, got {n_bursts}")
    if len(image_size) != 2 or min(image_size) < 16:
        raise ConfigError(f"image_size must be (width, height) with sides >= 16, got {image_size}")
    if not 1 <= cameras <= len(_CAMERAS):
        raise ConfigError(f"cameras must be in 1..{len(_CAMERAS)}, got {cameras}")
    for field, value in (
        ("singles_fraction", singles_fraction),
        ("mtime_only_fraction", mtime_only_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{field} must be in [0, 1], got {value}")
    if exact_duplicates < 0 or near_duplicates < 0:
        raise ConfigError(
            f"exact_duplicates and near_duplicates must be >= 0, "
            f"got {exact_duplicates} and {near_duplicates}"
        )
    if exact_duplicates + near_duplicates > n_bursts:
        raise ConfigError(
            f"exact_duplicates + near_duplicates ({exact_duplicates + near_duplicates}) must be "
            f"<= n_bursts ({n_bursts}): each copies a different shot"
        )
    unknown = sorted(set(names) - set(PHOTOS))
    if unknown or len(set(names)) <= cameras:
        raise ConfigError(
            f"photos must be more than cameras ({cameras}) distinct names from {PHOTOS}, "
            f"got {list(names)} (unknown: {unknown})"
        )


def _scene_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random window of ``_VIEW_AREA`` of the photo (same aspect), mirrored half the time."""
    w, h = photo.size
    side = np.sqrt(rng.uniform(*_VIEW_AREA))
    cw, ch = max(1, round(w * side)), max(1, round(h * side))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = photo.crop((x0, y0, x0 + cw, y0 + ch))
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < _MIRROR_P else view


def _burst_offsets(n: int, rng: np.random.Generator) -> np.ndarray:
    """Seconds from a burst's first shot to each of its ``n`` shots."""
    fps = rng.uniform(*_FPS)
    gaps = np.maximum(1.0 / fps + rng.normal(0.0, _JITTER_S, size=n - 1), 0.02)
    if n >= 3 and rng.random() < _PAUSE_P:
        gaps[int(rng.integers(1, n - 1))] += rng.uniform(*_PAUSE_S)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def _clock(seconds: float, subsec_digits: int) -> datetime:
    """The camera clock's reading ``seconds`` after _DAY_START, truncated to its resolution."""
    units = int(np.floor(seconds * 10**subsec_digits))
    return _DAY_START + timedelta(microseconds=units * 10 ** (6 - subsec_digits))


def _camera_path(cam: int, number: int) -> str:
    """A camera's name for its ``number``-th file: a new DCIM folder every 9999 files."""
    c = _CAMERAS[cam]
    folder, file_no = 100 + (number - 1) // 9999, (number - 1) % 9999 + 1
    return f"DCIM/{folder}{c.folder}/{c.prefix}{file_no:0{c.digits}d}.JPG"


def _exif(shot: _Shot) -> Image.Exif:
    c = _CAMERAS[shot.camera]
    exif = Image.Exif()
    exif[_MAKE], exif[_MODEL] = c.make, c.model
    ifd = exif.get_ifd(_EXIF_IFD)
    ifd[_BODY_SERIAL] = c.serial
    if shot.exif_time:
        stamp = shot.clock.strftime("%Y:%m:%d %H:%M:%S")
        exif[_DATETIME] = stamp
        ifd[_DATETIME_ORIGINAL] = stamp
        sub = shot.clock.microsecond // 10 ** (6 - c.subsec_digits)
        ifd[_SUBSEC_ORIGINAL] = f"{sub:0{c.subsec_digits}d}"
        if c.writes_offset:
            ifd[_OFFSET_ORIGINAL] = "+02:00"
    return exif


def _write_copies(
    out: Path, shots: list[_Shot], seed: int, n_exact: int, n_near: int, t_end: float
) -> list[list[str]]:
    """Writes the exports (exact byte copies, then near re-encodes); returns their manifest rows."""
    rng = np.random.default_rng([seed, 3])
    sources = rng.permutation(len(shots))
    jobs = sorted([(int(i), "exact") for i in sources[:n_exact]])
    jobs += sorted([(int(i), "near") for i in sources[n_exact : n_exact + n_near]])
    # Whole milliseconds, so the manifest's capture_time spells the mtime exactly.
    export_start = _DAY_START + timedelta(milliseconds=round((t_end + _EXPORT_DELAY_S) * 1000))
    rows = []
    for k, (i, kind) in enumerate(jobs):
        src = shots[i]
        instant = (export_start + timedelta(seconds=k * _EXPORT_STEP_S)).replace(tzinfo=_ZONE)
        if kind == "exact":
            path = out / "export" / src.path.parent.name / src.path.name
            data = src.path.read_bytes()
            # A copy keeps the EXIF time; one without carries only its (export) mtime.
            capture_time = src.capture_time() if src.exif_time else _iso_utc(instant)
            degradation = src.degradation
        else:
            path = out / "export" / "web" / src.path.parent.name / f"{src.path.stem}.jpg"
            scale = round(float(rng.uniform(*_NEAR_SCALE)), 2)
            quality = int(rng.integers(_NEAR_QUALITY[0], _NEAR_QUALITY[1] + 1))
            with Image.open(src.path) as img:
                size = (round(img.width * scale), round(img.height * scale))
                small = img.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=quality)  # no exif= argument: EXIF stripped
            data = buf.getvalue()
            capture_time = _iso_utc(instant)
            reencode = f"reencode:{quality}@{scale:g}"
            degradation = reencode if src.degradation == "none" else f"{src.degradation}+{reencode}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        _set_mtime(path, instant)
        copy = _Shot(
            path, src.series_id, False, src.camera, src.clock, False, degradation, src.base_photo
        )
        rows.append(_row(copy, capture_time, degradation, str(src.path)))
    return rows


def _row(shot: _Shot, capture_time: str, degradation: str, duplicate_of: str) -> list[str]:
    c = _CAMERAS[shot.camera]
    camera = f"{c.model} #{c.serial}"
    return [
        str(shot.path),
        shot.series_id,
        str(int(shot.is_best)),
        camera,
        capture_time,
        degradation,
        duplicate_of,
        shot.base_photo,
    ]


def _iso_utc(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat(timespec="milliseconds")


def _set_mtime(path: Path, instant: datetime) -> None:
    # Integer nanoseconds from the exact datetime (no float rounding): same args, same mtimes.
    delta = instant - datetime(1970, 1, 1, tzinfo=UTC)
    ns = (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    os.utime(path, ns=(ns, ns))


def main(argv: list[str] | None = None) -> int:
    """Command line: generate a library and print the manifest path."""
    parser = argparse.ArgumentParser(
        prog="python -m keeper_core.synthetic_library",
        description="Generate a synthetic photo library (bursts, two cameras, duplicates).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--bursts", required=True, type=int, help="number of series")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="320x240", help="WxH, e.g. 320x240")
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--singles", type=float, default=0.15, help="fraction of single shots")
    parser.add_argument("--exact-duplicates", type=int, default=0)
    parser.add_argument("--near-duplicates", type=int, default=0)
    parser.add_argument("--mtime-only", type=float, default=0.0, help="fraction without EXIF time")
    args = parser.parse_args(argv)
    try:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--size must look like 320x240, got {args.size!r}") from None
        manifest = generate_library(
            args.out,
            n_bursts=args.bursts,
            seed=args.seed,
            image_size=(w, h),
            cameras=args.cameras,
            singles_fraction=args.singles,
            exact_duplicates=args.exact_duplicates,
            near_duplicates=args.near_duplicates,
            mtime_only_fraction=args.mtime_only,
        )
    except KeeperError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
