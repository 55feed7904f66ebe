"""The HTML contact sheet of a ``keeper pick`` run: what a photographer looks at instead of the table.

Layout under ``out_dir`` (a local folder or an ``s3://`` prefix; every file is written with
:func:`keeper_core.storage.write_bytes`)::

    index.html               summary, ranker banner, stage times, list of pages, failed files
    pages/page-0001.html     groups in time order, one row of thumbnails per group
    thumbs/ab/<image_id>.jpg thumbnails: written by whoever decoded the image (the embed job,
                             with :func:`thumbnail_jpeg` and :func:`thumbnail_name`), only linked here

The sheet must stay usable at 100k images, so thumbnails are separate lazy-loaded files (never
inlined base64), a page holds at most ``groups_per_page`` groups and ``images_per_page`` images
(a larger group is split over pages as parts), each image costs a few hundred bytes of HTML, and
the index lists pages rather than images. Pages work offline and from S3 static hosting: no
external resources, one inline stylesheet, one small inline script (a filter and arrow-key
paging) that the page does not need to be readable.

Everything taken from the data (file names, cameras, reasons, errors) is HTML-escaped; strings
longer than ``_CLIP`` characters are shown shortened with an ellipsis (the picks table keeps
them whole).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from keeper_core import htmltext, storage
from keeper_core.errors import ConfigError, DataError
from keeper_core.images import to_rgb
from keeper_core.progress import format_seconds

__all__ = [
    "FAILED_COLUMNS",
    "PICKS_COLUMNS",
    "THUMB_SIZE",
    "SheetSummary",
    "thumbnail_jpeg",
    "thumbnail_name",
    "write_contact_sheet",
]

#: Longest side of a stored thumbnail: sharp at the sheet's 160 CSS px on a 1.5x screen.
THUMB_SIZE = 256
#: Columns of the pick frame the sheet reads.
PICKS_COLUMNS = (
    "image_uri",
    "image_id",
    "group",
    "group_size",
    "capture_time",
    "camera",
    "rank",
    "score",
    "prob",
    "decision",
    "reasons",
    "duplicate_of",
    "duplicate_kind",
)
FAILED_COLUMNS = ("image_uri", "stage", "reason", "error")
_DECISIONS = {"keep": 0, "alternate": 1, "reject": 2}
_CLASS = {"keep": "k", "alternate": "a", "reject": "r"}
_IMAGE_ID = re.compile(r"[0-9a-f]{2,128}")
_CLIP = 300  # bounds one image's HTML, so page size follows the image count
_MAX_REASONS = 8  # reason lines per image: with _CLIP, what bounds one image's HTML
_FAILED_SHOWN = 200  # failed files listed on the index; a per-reason count covers the rest
_MAX_LISTED = 10  # row numbers named in an error message


def thumbnail_jpeg(image: Image.Image, size: int = THUMB_SIZE, quality: int = 80) -> bytes:
    """A JPEG thumbnail of ``image``: longest side at most ``size``, aspect ratio kept, RGB.

    Images smaller than ``size`` are not enlarged. Non-RGB modes are converted as
    :func:`keeper_core.images.decode_image` does (alpha composited on white). The input is left
    untouched.

    Args:
        image: the decoded image (normally ``decode_image``'s output, already EXIF-rotated).
        size: longest side in pixels, >= 1.
        quality: JPEG quality, 1..95 (PIL's useful range).

    Raises:
        ConfigError: ``size`` or ``quality`` out of range.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"thumbnail size must be a positive int, got {size!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ConfigError(f"thumbnail quality must be an int in 1..95, got {quality!r}")
    w, h = image.size
    scale = min(1.0, size / max(w, h))
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Shrink before converting: a 64 MP frame is never copied at full size. Bilinear after a
    # box reduce (reducing_gap) and no Huffman optimisation: 0.7 ms for a 320x240 photo against
    # 1.8 ms with Lanczos + optimize, at contact-sheet size the same to the eye (and 5 % larger).
    thumb = (
        image
        if target == image.size
        else image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    )
    thumb = thumb if thumb.mode == "RGB" else to_rgb(thumb)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_name(image_id: str) -> str:
    """Where the thumbnail of ``image_id`` lives, relative to the sheet's folder.

    ``thumbs/<first 2 hex>/<image_id>.jpg``: the two-character fan-out keeps any one folder
    (or S3 listing) to 1/256 of the library.

    Raises:
        DataError: ``image_id`` is not lower-case hex (it becomes a path: nothing else may pass).
    """
    if not isinstance(image_id, str) or not _IMAGE_ID.fullmatch(image_id):
        raise DataError(f"image_id must be 2..128 lower-case hex digits, got {image_id!r}")
    return f"thumbs/{image_id[:2]}/{image_id}.jpg"


_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class SheetSummary(BaseModel):
    """What the index page's header shows about the run."""

    model_config = ConfigDict(extra="forbid")

    images: int = Field(ge=0)
    groups: int = Field(ge=0)
    keepers: int = Field(ge=0)
    alternates: int = Field(ge=0)
    rejects: int = Field(ge=0)
    duplicates: int = Field(ge=0)
    failed: int = Field(ge=0)  # files keeper could not read
    seconds: dict[str, _Seconds]  # wall time per stage, in the order the stages ran
    ranker: str  # the model label, or the zero-shot rule's label
    # Shown as banners on every page, e.g. "random CLIP weights: similarities are not meaningful".
    notes: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Pagination


@dataclass
class _Part:
    """One group, or one slice of a group too large for a page."""

    group: int
    rows: np.ndarray  # row positions in picks, in display order
    part: int = 1
    parts: int = 1


@dataclass
class _Page:
    number: int
    parts: list[_Part] = field(default_factory=list)
    images: int = 0

    @property
    def name(self) -> str:
        return _page_name(self.number)


def _page_name(number: int) -> str:
    return f"page-{number:04d}.html"


def _paginate(parts: Iterable[_Part], groups_per_page: int, images_per_page: int) -> list[_Page]:
    pages: list[_Page] = []
    for part in parts:
        n = len(part.rows)
        page = pages[-1] if pages else None
        if page is None or len(page.parts) >= groups_per_page or page.images + n > images_per_page:
            page = _Page(len(pages) + 1)
            pages.append(page)
        page.parts.append(part)
        page.images += n
    return pages


def _split(group: int, rows: np.ndarray, images_per_page: int) -> list[_Part]:
    if len(rows) <= images_per_page:
        return [_Part(group, rows)]
    chunks = [rows[i : i + images_per_page] for i in range(0, len(rows), images_per_page)]
    return [_Part(group, c, i + 1, len(chunks)) for i, c in enumerate(chunks)]


# ---------------------------------------------------------------------------------------------
# Cell values


def _esc(value: object) -> str:
    text = str(value)
    if len(text) > _CLIP:
        text = text[: _CLIP - 1] + "\u2026"
    return htmltext.escape(text)


def _missing(value: Any) -> bool:
    if isinstance(value, list | tuple | np.ndarray):  # a reasons list is a value, not missing
        return False
    return bool(pd.isna(value))  # None, NaN of any float type, pd.NA, NaT


def _reasons(value: object) -> list[str]:
    if _missing(value):
        return []
    if isinstance(value, str):  # a lone reason, not a list of characters
        return [value]
    if isinstance(value, Iterable):
        reasons = [str(r) for r in value if not _missing(r)]
    else:
        reasons = [str(value)]
    if len(reasons) > _MAX_REASONS:
        more = len(reasons) - _MAX_REASONS + 1
        reasons = [*reasons[: _MAX_REASONS - 1], f"(+{more} more reasons)"]
    return reasons


def _basename(uri: str) -> str:
    return uri.rstrip("/").rpartition("/")[2] or uri


def _folder(uri: str) -> str:
    return uri.rstrip("/").rpartition("/")[0]


def _num(value: Any, fmt: str) -> str:
    if _missing(value):
        return "\u2013"
    return format(float(value), fmt)


def _when(value: object) -> str | None:
    return None if _missing(value) or not str(value).strip() else str(value).strip()


def _time_range(lo: str | None, hi: str | None) -> str:
    """Both ends of a time span, the date written once when both ends share it."""
    if lo is None or hi is None:
        return "no capture time"
    lo, hi = lo.replace("T", " "), hi.replace("T", " ")
    if lo == hi:
        return lo
    if lo[:10] == hi[:10] and len(hi) > 11:
        hi = hi[11:]
    return f"{lo} \u2013 {hi}"


# ---------------------------------------------------------------------------------------------
# The frame, as plain lists (row access by position is ~50x faster than pandas .iloc)


@dataclass
class _Rows:
    uri: list[str]
    thumb: list[str]
    group: np.ndarray
    group_size: list[Any]
    time: list[str | None]
    camera: list[str]
    rank: list[Any]
    score: list[Any]
    prob: list[Any]
    decision: list[str]
    reasons: list[list[str]]
    dup_of: np.ndarray
    dup_kind: list[str | None]


def _bad_rows(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


def _rows_message(rows: list[int]) -> str:
    more = f" (+{len(rows) - _MAX_LISTED} more)" if len(rows) > _MAX_LISTED else ""
    return ", ".join(map(str, rows[:_MAX_LISTED])) + more


def _read_picks(picks: pd.DataFrame) -> _Rows:
    missing = [c for c in PICKS_COLUMNS if c not in picks.columns]
    if missing:
        raise DataError(f"picks lacks columns {missing} (needs {list(PICKS_COLUMNS)})")
    n = len(picks)
    group = pd.to_numeric(picks["group"], errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    bad = ~np.isfinite(group) | (group < 0) | (group != np.round(group))
    if bad.any():
        rows = _bad_rows(bad)
        raise DataError(
            f"picks: group must be a non-negative int; rows {_rows_message(rows)}", rows=rows
        )
    decision = picks["decision"].astype("string").fillna("").tolist()
    bad = np.array([d not in _DECISIONS for d in decision], dtype=bool)
    if bad.any():
        rows = _bad_rows(bad)
        raise DataError(
            f"picks: decision must be one of {list(_DECISIONS)}; rows {_rows_message(rows)}",
            rows=rows,
        )
    ids = picks["image_id"].astype("string").fillna("")
    bad = ~ids.str.fullmatch(_IMAGE_ID.pattern).fillna(False).to_numpy(dtype=bool)
    if bad.any():
        rows = _bad_rows(bad)
        raise DataError(
            f"picks: image_id must be lower-case hex; rows {_rows_message(rows)}", rows=rows
        )
    dup_of = (
        pd.to_numeric(picks["duplicate_of"], errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
    )
    bad = (dup_of < -1) | (dup_of >= n)
    if bad.any():
        rows = _bad_rows(bad)
        raise DataError(
            f"picks: duplicate_of must be -1 or a row position < {n}; rows {_rows_message(rows)}",
            rows=rows,
        )
    camera = picks["camera"].astype("string").fillna("unknown").tolist()
    return _Rows(
        uri=picks["image_uri"].astype("string").fillna("").tolist(),
        thumb=[thumbnail_name(i) for i in ids.tolist()],
        group=group.astype(np.int64),
        group_size=picks["group_size"].tolist(),
        time=[_when(t) for t in picks["capture_time"].tolist()],
        camera=[c or "unknown" for c in camera],
        rank=picks["rank"].tolist(),
        score=picks["score"].tolist(),
        prob=picks["prob"].tolist(),
        decision=decision,
        reasons=[_reasons(r) for r in picks["reasons"].tolist()],
        dup_of=dup_of,
        dup_kind=[None if _missing(k) else str(k) for k in picks["duplicate_kind"].tolist()],
    )


def _display_order(r: _Rows) -> np.ndarray:
    """Rows by group, then keeper, alternates, rejects, each by rank (unranked last)."""
    rank = pd.to_numeric(pd.Series(r.rank), errors="coerce").fillna(np.inf).to_numpy()
    decision = np.array([_DECISIONS[d] for d in r.decision], dtype=np.int64)
    position = np.arange(len(r.uri))
    return np.lexsort((position, rank, decision, r.group))


def _parts(r: _Rows, images_per_page: int) -> list[_Part]:
    order = _display_order(r)
    if len(order) == 0:
        return []
    sorted_groups = r.group[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    ends = np.r_[starts[1:], len(order)]
    out: list[_Part] = []
    for s, e in zip(starts, ends, strict=True):
        out.extend(_split(int(sorted_groups[s]), order[s:e], images_per_page))
    return out


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,sans-serif;margin:16px 24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:4px 0 10px} h2{font-size:14px;font-weight:600;margin:0 0 6px}
a{color:#2554b0}
.warn{background:#fff3cd;border:2px solid #d9a400;padding:8px 12px;margin:8px 0;font-weight:600}
.alert{background:#fde2e1;border:2px solid #c0392b;padding:8px 12px;margin:8px 0;font-weight:600}
.ranker{background:#e8eefb;border:1px solid #7d9be0;padding:8px 12px;margin:8px 0}
table.m{border-collapse:collapse;margin:8px 0 16px} table.m td,table.m th{border:1px solid #ccc;padding:3px 10px}
table.m td.n{text-align:right;font-variant-numeric:tabular-nums} table.m th{background:#f0f0f0;text-align:left}
.nav{display:flex;gap:14px;align-items:center;margin:8px 0;flex-wrap:wrap}
.g{border-top:1px solid #ddd;padding:10px 0}
.g h2 span{color:#666;font-weight:400}
.row{display:flex;flex-wrap:wrap;gap:8px}
.s{position:relative;margin:0;width:166px;padding:2px;border:3px solid transparent;font-size:11px;background:#fff;outline:none}
.s img{display:block;width:160px;height:160px;object-fit:contain;background:#e6e6e6;position:relative;color:#777;font-size:11px}
.s img::after{content:attr(alt);position:absolute;inset:0;display:flex;align-items:center;justify-content:center;text-align:center;padding:6px;background:#e6e6e6;word-break:break-all}
.s figcaption{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;padding-top:2px}
.s figcaption::before{display:inline-block;padding:0 4px;border-radius:3px;margin-right:4px;color:#fff;font-weight:600}
.s.k{border-color:#2a9d3a} .s.k figcaption::before{content:"KEEP";background:#2a9d3a}
.s.a{border:3px dashed #3564c4} .s.a figcaption::before{content:"ALT";background:#3564c4}
.s.r{opacity:.45} .s.r:hover,.s.r:focus{opacity:1} .s.r figcaption::before{content:"REJ";background:#888}
.s .d{display:inline-block;padding:0 4px;border-radius:3px;margin-right:4px;color:#fff;background:#c0392b;text-decoration:none;font-weight:600}
.s:focus{box-shadow:0 0 0 2px #222}
.s:focus::after{content:attr(title);position:absolute;left:0;top:100%;z-index:5;width:260px;padding:6px 8px;background:#222;color:#fff;white-space:pre-line;font-size:12px;border-radius:4px}
body.fr .g:not(.hr),body.fd .g:not(.hd){display:none}
.legend span{margin-right:14px}
"""

# Filter by group flags, remember it across pages, arrow keys page. Nothing else needs it.
_JS = """
(function(){var s=document.getElementById('f'),b=document.body;
function a(){b.className=s.value?'f'+s.value:''}
try{s.value=sessionStorage.getItem('keeper-f')||''}catch(e){}a();
s.onchange=function(){try{sessionStorage.setItem('keeper-f',s.value)}catch(e){}a()};
document.onkeydown=function(e){if(e.altKey||e.ctrlKey||e.metaKey||e.target.tagName==='SELECT')return;
var l=document.getElementById(e.key==='ArrowLeft'?'prev':e.key==='ArrowRight'?'next':'');
if(l)location.href=l.href}})();
"""


def _head(title: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
    )


def _banners(summary: SheetSummary) -> str:
    parts = [f"<div class='ranker'>Ranked by: <b>{_esc(summary.ranker)}</b></div>"]
    parts += [f"<div class='warn'>{_esc(n)}</div>" for n in summary.notes]
    parts += [f"<div class='alert'>{_esc(w)}</div>" for w in summary.warnings]
    return "".join(parts)


def _legend() -> str:
    return (
        "<p class='legend'><span>KEEP: the keeper of its group</span><span>ALT: an alternate"
        "</span><span>REJ (dimmed): a reject</span><span>DUP / NEAR: an exact / near duplicate"
        " (links to the image it duplicates)</span><span>hover, tap or Tab to an image: why"
        "</span></p>"
    )


@dataclass
class _PageStats:
    lo: str | None = None
    hi: str | None = None
    groups: int = 0
    counts: Counter[str] = field(default_factory=Counter)


def _span(r: _Rows, rows: Sequence[int]) -> tuple[str | None, str | None]:
    # ISO 8601 strings order as times when they share a form; only a label depends on it.
    times = [t for t in (r.time[i] for i in rows) if t is not None]
    return (min(times), max(times)) if times else (None, None)


def _figure(r: _Rows, i: int, folder: str | None, page_of: np.ndarray, this_page: int) -> str:
    uri = r.uri[i]
    name = _basename(uri)
    lines = [name if folder is not None else uri]
    lines.append(
        f"rank {_num(r.rank[i], '.0f')} \u00b7 score {_num(r.score[i], '.3g')} \u00b7 p {_num(r.prob[i], '.2f')}"
    )
    dup = ""
    target = int(r.dup_of[i])
    if target >= 0:
        kind = r.dup_kind[i] or "near"
        lines.append(f"{kind} duplicate of {r.uri[target]}")
        page = int(page_of[target])
        href = f"#r{target}" if page == this_page else f"{_page_name(page)}#r{target}"
        label = "DUP" if kind == "exact" else "NEAR"
        dup = f"<a class='d' href='{href}'>{label}</a>"
    lines += r.reasons[i]
    title = "\n".join(_esc(line) for line in lines)
    alt = _esc(name)
    cls = _CLASS[r.decision[i]]
    return (
        f"<figure id='r{i}' class='s {cls}' tabindex='0' title='{title}'>"
        f"<img loading='lazy' src='../{r.thumb[i]}' alt='{alt}'>"
        f"<figcaption>{dup}{alt}</figcaption></figure>"
    )


def _render_page(
    page: _Page,
    n_pages: int,
    r: _Rows,
    page_of: np.ndarray,
    summary: SheetSummary,
    title: str,
) -> tuple[str, _PageStats]:
    stats = _PageStats()
    body: list[str] = []
    for part in page.parts:
        rows = [int(i) for i in part.rows]
        lo, hi = _span(r, rows)
        if lo is not None and hi is not None:
            stats.lo = lo if stats.lo is None else min(stats.lo, lo)
            stats.hi = hi if stats.hi is None else max(stats.hi, hi)
        if part.part == 1:
            stats.groups += 1
        stats.counts.update(r.decision[i] for i in rows)
        dups = sum(1 for i in rows if r.dup_of[i] >= 0)
        stats.counts["duplicate"] += dups
        flags = ["g"]
        flags += ["hr"] if any(r.decision[i] == "reject" for i in rows) else []
        flags += ["hd"] if dups else []
        folders = {_folder(r.uri[i]) for i in rows}
        folder = folders.pop() if len(folders) == 1 else None
        cameras = sorted({r.camera[i] for i in rows})
        camera = ", ".join(cameras[:3]) + (f" +{len(cameras) - 3}" if len(cameras) > 3 else "")
        size = r.group_size[rows[0]]
        size_txt = f"{int(size)} images" if not _missing(size) else f"{len(rows)} images"
        part_txt = f" \u00b7 part {part.part}/{part.parts}" if part.parts > 1 else ""
        where = f" <span>{_esc(folder)}</span>" if folder else ""
        body.append(
            f"<section class='{' '.join(flags)}' id='g{part.group}-{part.part}'>"
            f"<h2>#{part.group} \u00b7 {_esc(_time_range(lo, hi))} \u00b7 {_esc(camera)} \u00b7 "
            f"{size_txt}{part_txt}{where}</h2><div class='row'>"
        )
        body += [_figure(r, i, folder, page_of, page.number) for i in rows]
        body.append("</div></section>")

    n = page.number
    prev = f"<a id='prev' href='{_page_name(n - 1)}'>\u2190 previous</a>" if n > 1 else ""
    nxt = f"<a id='next' href='{_page_name(n + 1)}'>next \u2192</a>" if n < n_pages else ""
    nav = (
        f"<div class='nav'><a href='../index.html'>index</a>{prev}<b>page {n} of {n_pages}</b>{nxt}"
        "<label>show <select id='f'><option value=''>all groups</option>"
        "<option value='r'>groups with rejects</option>"
        "<option value='d'>groups with duplicates</option></select></label></div>"
    )
    # The bottom links repeat the top ones without their ids (ids are for the arrow keys).
    prev_b, next_b = prev.replace(" id='prev'", ""), nxt.replace(" id='next'", "")
    bottom = f"<div class='nav'><a href='../index.html'>index</a>{prev_b}"
    bottom += f"<b>page {n} of {n_pages}</b>{next_b}</div>"
    head = (
        _head(f"{title} \u00b7 page {n} of {n_pages}")
        + f"<h1>{_esc(title)}: page {n} of {n_pages}, {_esc(_time_range(stats.lo, stats.hi))}</h1>"
        + _banners(summary)
        + _legend()
        + nav
    )
    return head + "".join(body) + bottom + f"<script>{_JS}</script></body></html>", stats


def _render_failed(failed: pd.DataFrame | None) -> str:
    if failed is None or len(failed) == 0:
        return ""
    missing = [c for c in FAILED_COLUMNS if c not in failed.columns]
    if missing:
        raise DataError(f"failed lacks columns {missing} (needs {list(FAILED_COLUMNS)})")
    cols = {c: failed[c].astype("string").fillna("").tolist() for c in FAILED_COLUMNS}
    by_reason = Counter(zip(cols["stage"], cols["reason"], strict=True))
    parts = [f"<h2>Files keeper could not read: {len(failed):,}</h2><table class='m'>"]
    parts.append("<tr><th>stage</th><th>reason</th><th>files</th></tr>")
    parts += [
        f"<tr><td>{_esc(s)}</td><td>{_esc(why)}</td><td class='n'>{k:,}</td></tr>"
        for (s, why), k in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    parts.append(
        "</table><table class='m'><tr><th>file</th><th>stage</th><th>reason</th><th>error</th></tr>"
    )
    shown = min(len(failed), _FAILED_SHOWN)
    parts += [
        f"<tr><td>{_esc(cols['image_uri'][i])}</td><td>{_esc(cols['stage'][i])}</td>"
        f"<td>{_esc(cols['reason'][i])}</td><td>{_esc(cols['error'][i])}</td></tr>"
        for i in range(shown)
    ]
    parts.append("</table>")
    if len(failed) > shown:
        parts.append(
            f"<p>\u2026 and {len(failed) - shown:,} more failed files not listed here.</p>"
        )
    return "".join(parts)


def _render_index(
    summary: SheetSummary,
    pages: list[_Page],
    stats: list[_PageStats],
    failed: pd.DataFrame | None,
    title: str,
) -> str:
    s = summary
    counts = [
        ("images", s.images),
        ("groups", s.groups),
        ("keepers", s.keepers),
        ("alternates", s.alternates),
        ("rejects", s.rejects),
        ("duplicates", s.duplicates),
        ("failed", s.failed),
    ]
    parts = [_head(title), f"<h1>{_esc(title)}</h1>", _banners(s)]
    parts.append("<table class='m' id='summary'><tr>")
    parts += [f"<th>{k}</th>" for k, _ in counts]
    parts.append("</tr><tr>")
    parts += [f"<td class='n'>{v:,}</td>" for _, v in counts]
    parts.append("</tr></table>")
    if s.seconds:
        parts.append("<table class='m' id='stages'><tr><th>stage</th><th>time</th></tr>")
        parts += [
            f"<tr><td>{_esc(k)}</td><td class='n'>{format_seconds(v, tenths=True)}</td></tr>"
            for k, v in s.seconds.items()
        ]
        parts.append(
            f"<tr><th>total</th><th>{format_seconds(sum(s.seconds.values()), tenths=True)}</th></tr></table>"
        )
    parts.append(_legend())
    parts.append(f"<h2>Pages: {len(pages):,}</h2>")
    if pages:
        parts.append(
            "<table class='m' id='pages'><tr><th>page</th><th>captured</th><th>groups</th>"
            "<th>images</th><th>keep</th><th>alt</th><th>reject</th><th>dup</th></tr>"
        )
        for page, st in zip(pages, stats, strict=True):
            c = st.counts
            parts.append(
                f"<tr><td><a href='pages/{page.name}'>{page.number}</a></td>"
                f"<td>{_esc(_time_range(st.lo, st.hi))}</td><td class='n'>{st.groups:,}</td>"
                f"<td class='n'>{page.images:,}</td><td class='n'>{c['keep']:,}</td>"
                f"<td class='n'>{c['alternate']:,}</td><td class='n'>{c['reject']:,}</td>"
                f"<td class='n'>{c['duplicate']:,}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>No images to show.</p>")
    parts.append(_render_failed(failed))
    parts.append("</body></html>")
    return "".join(parts)


def write_contact_sheet(
    out_dir: str,
    picks: pd.DataFrame,
    summary: SheetSummary,
    *,
    failed: pd.DataFrame | None = None,
    groups_per_page: int = 100,
    images_per_page: int = 1000,
    title: str = "keeper pick",
) -> str:
    """Write the contact sheet of a pick run: ``index.html`` and ``pages/page-NNNN.html``.

    Groups appear in ``group`` order (time order), each as a row of thumbnails: the keeper
    first (green border, KEEP), then alternates (ALT), then rejects (dimmed, REJ), each by rank;
    duplicates carry a DUP/NEAR badge linking to the image they duplicate. Thumbnails are linked
    at :func:`thumbnail_name` under ``out_dir`` (a missing one shows a grey box with the file
    name). Pages are written before the index, so an index that exists lists finished pages.

    Args:
        out_dir: local folder or ``s3://`` prefix.
        picks: the pick frame (:data:`PICKS_COLUMNS`; other columns are ignored). Row positions
            are what ``duplicate_of`` refers to and what the ``#r<position>`` anchors name.
        summary: the run's numbers for the index page.
        failed: files that could not be read (``image_uri, stage, reason, error``); the index
            counts them by stage and reason and lists the first 200.
        groups_per_page: groups (or parts of groups) per page.
        images_per_page: images per page; a group larger than this is split into parts, so
            no page grows past ~``images_per_page`` x 400 bytes.
        title: the heading of every page.

    Returns:
        The URI of ``index.html``.

    Raises:
        ConfigError: ``groups_per_page`` or ``images_per_page`` below 1.
        DataError: ``picks`` or ``failed`` lacks columns, or holds a group that is not a
            non-negative int, an unknown decision, an image_id that is not hex, or a
            ``duplicate_of`` outside the frame (the rows are named).
        StorageError: a write failed.
    """
    for name, value in (("groups_per_page", groups_per_page), ("images_per_page", images_per_page)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    rows = _read_picks(picks)
    pages = _paginate(_parts(rows, images_per_page), groups_per_page, images_per_page)
    page_of = np.zeros(len(rows.uri), dtype=np.int64)
    for page in pages:
        for part in page.parts:
            page_of[part.rows] = page.number
    stats: list[_PageStats] = []
    rendered: list[tuple[str, str]] = []
    for page in pages:
        text, st = _render_page(page, len(pages), rows, page_of, summary, title)
        stats.append(st)
        rendered.append((page.name, text))
    # Render everything (and so fail on bad data) before the first write.
    index_html = _render_index(summary, pages, stats, failed, title)
    for name, text in rendered:
        storage.write_bytes(storage.join(out_dir, "pages", name), text.encode("utf-8"))
    index = storage.join(out_dir, "index.html")
    storage.write_bytes(index, index_html.encode("utf-8"))
    return index
