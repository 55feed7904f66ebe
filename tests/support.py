"""Helpers shared by the test suites (on sys.path through pytest's ``pythonpath``)."""

from __future__ import annotations

import hashlib
import importlib
import io
import itertools
import json
import re
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def import_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` as a module. The folder is on ``sys.path`` only while it is
    imported, so that ``benchmarks/embed.py`` or ``serve.py`` shadow nothing imported later."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process in session ``sid``: what one command started with
    ``start_new_session=True`` left running, daemons included (``ray start`` detaches its
    daemons from their parent, not from the session; some rename themselves ``ray::...``)."""
    import contextlib

    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                out[int(stat.parent.name)] = cmd.strip()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytearray:
    """A tar of regular files (name, data), in this order and format, as a mutable buffer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return bytearray(buf.getvalue())


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG header declaring width x height, with a tiny IDAT.

    If a decoder ever tried to load it, it would fail as truncated (the IDAT holds ~1 row),
    so a "too_many_pixels" refusal proves the check ran before decoding.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_with_scans(extra: int, size: tuple[int, int] = (96, 64)) -> bytes:
    """A progressive JPEG (PIL's script: 10 scans) with its smallest scan repeated ``extra``
    more times before the EOI: what a scan bomb looks like to a decoder (libjpeg warns about
    the repeated progression and decodes on, a pass over every block per scan)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    ends = [*starts[1:], len(data) - 2]
    a, b = min(zip(starts, ends, strict=True), key=lambda se: se[1] - se[0])
    # From the SOS to the next scan's SOS: DHT segments between scans come along, harmlessly.
    return data[:-2] + data[a:b] * extra + data[-2:]


def embed_files(
    root: str,
    files: dict[str, bytes],
    *,
    spec: str,
    parts: int = 1,
    capture: bool = True,
    table: str = "table",
) -> str:
    """Write ``files`` under ``root``/photos and embed them into new parts of ``root``/``table``.

    The embed job's own stages (decode, model, part writer) called directly, without Ray: for
    tests of what reads a table (index, dedup, search). Returns the table's URI.
    """
    import numpy as np

    from keeper_core import storage
    from keeper_train.jobs import embed

    uris = []
    for name, data in files.items():
        uri = storage.join(root, "photos", name)
        storage.write_bytes(uri, data)
        uris.append(uri)
    table = storage.join(root, table)
    limits = {
        "max_pixels": 64_000_000,
        "max_bytes": 64 << 20,
        "max_raw_bytes": 256 << 20,
        "min_side": 16,
    }
    prepared = embed.prepare_batch(
        {"image_uri": np.array(uris, dtype=object)},
        spec=spec,
        limits=limits,
        draft=True,
        errors_dir=storage.join(table, embed.ERRORS),
        run_id="test",
        capture=capture,
    )
    assert len(prepared["image_uri"]) == len(uris), "a test photo failed to decode"
    rows = embed.EmbedStage(spec, 64)(prepared)
    bounds = np.linspace(0, len(uris), parts + 1).astype(int)
    for lo, hi in itertools.pairwise(bounds):
        embed.write_batch(
            {k: v[lo:hi] for k, v in rows.items()},
            spec=spec,
            embeddings_dir=storage.join(table, embed.EMBEDDINGS),
        )
    return table


def offer_rows(
    request: str, arm: str | None, group: str, n: int, route: str = "rank", first: str = "keeper"
) -> list[dict[str, Any]]:
    """Offer rows of one answer as ``keeper_core.feedback.OfferLog`` takes them: ``n`` images of
    one group, ranked in order (``image_id`` ``{request}-img{j}``), the first offered as
    ``first``; the challenger's model is version 2, anything else version 1."""
    return [
        {
            "request_id": request,
            "route": route,
            "client": None,
            "arm": arm,
            "model": f"models:/r/{1 if arm != 'challenger' else 2}",
            "model_spec": "keeper-tiny:random",
            "group_id": group,
            "group_size": n,
            "image_id": f"{request}-img{j}",
            "image_uri": None,
            "position": j,
            "rank": j,
            "score": float(n - j),
            "offered": first if j == 0 else "candidate",
            "embedding": None,
            "quality": None,
        }
        for j in range(n)
    ]


def write_reference_collection(
    root: str,
    name: str,
    *,
    dim: int,
    spec: str,
    n: int = 12,
    row_spec: str | None = None,
    features: dict[str, Any] | None = None,
    parts: int = 2,
    seed: int = 0,
    updated_at: str = "2026-01-02T00:00:00+00:00",
) -> Any:
    """A reference collection ``ROOT/NAME`` written directly (no embed job): ``n`` random unit
    ``dim``-d embeddings in ``parts`` Parquet parts, rows of ``row_spec`` (default ``spec``), the
    given quality ``features`` (default random sharpness and brightness), and its reference.json.
    Returns the (n, dim) embeddings."""
    import numpy as np
    import pyarrow as pa

    from keeper_core import storage
    from keeper_core.references import ReferenceMeta, collection_uri, write_meta

    emb = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 1)
    if features is None:
        features = {"sharpness": rng.uniform(0, 8, n), "brightness": rng.uniform(0, 1, n)}
    folder = storage.join(collection_uri(root, name), "embeddings")
    for i, rows in enumerate(np.array_split(np.arange(n), parts)):
        cols = {
            "image_id": pa.array([f"id{j}" for j in rows]),
            "image_uri": pa.array([f"/photos/{j}.jpg" for j in rows]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb[rows].ravel()), dim),
            "model_spec": pa.array([row_spec or spec] * len(rows)),
            **{f: pa.array(np.asarray(v)[rows], pa.float64()) for f, v in features.items()},
        }
        storage.write_parquet(pa.table(cols), storage.join(folder, f"part-{i}.parquet"))
    meta = ReferenceMeta(
        name=name,
        model_spec=spec,
        embed_dim=dim,
        images=n,
        created_at="2026-01-01T00:00:00+00:00",
        updated_at=updated_at,
    )
    write_meta(root, meta)
    return emb


def small_app_overrides(folder: Any, spec: str, **extra: Any) -> dict[str, Any]:
    """``keeper_serve.local.start`` overrides for a test app on the 2-core session Ray: ``spec``
    served, no ranker, the token file ``folder``/token (written by the caller), MLflow's store
    under ``folder``, one small replica each (a VlmJudge only with ``vlm.source`` in ``extra``);
    ``extra`` keys added or replacing these."""
    small = {"KeeperIngress": 0.25, "SeriesRanker": 0.1, "ClipEncoder": 0.5}
    if extra.get("vlm.source") or (extra.get("vlm") or {}).get("source"):
        small["VlmJudge"] = 0.1
    overrides: dict[str, Any] = {
        "clip_model": spec,
        "data_dir": str(folder / "keeper-data"),
        "ranker.model_uri": None,
        "auth.token_file": str(folder / "token"),
    }
    for name, cpus in small.items():
        overrides[f"deployments.{name}.ray_actor_options.num_cpus"] = cpus
        overrides[f"deployments.{name}.autoscaling_config.max_replicas"] = 1
    return {**overrides, **extra}


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: real structure, different per seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], axis=-1)
    base = base * rng.uniform(0.4, 1.0, 3) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


#: A job's logging line (``job_main``'s format), not an error line.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d ")


def fails_cleanly(capsys: Any, argv: list[str], *says: str) -> str:
    """Run ``keeper ARGV``; it must exit 2 with one error line (saying each of ``says``)."""
    from keeper_core.cli import main as keeper

    rc = keeper(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"keeper {argv[0]}: error: "), lines[0]
    for s in says:
        assert s in lines[0], lines[0]
    return lines[0]


def write_embed_table(
    out: Path, uris: list[str], *, spec: str = "keeper-tiny:random", drop: tuple[str, ...] = ()
) -> Path:
    """Write ``out/embeddings/part-0.parquet``, the table keeper embed writes for ``uris`` (its
    own ``embedding_table`` schema; 8-d random embeddings, flat quality features), less ``drop``;
    returns ``out``."""
    import numpy as np

    from keeper_core import storage
    from keeper_core.quality import FEATURE_NAMES
    from keeper_train.jobs.embed import embedding_table

    n = len(uris)
    batch: dict[str, Any] = {
        "image_uri": np.array(uris, dtype=object),
        "image_id": np.array([f"id{i}" for i in range(n)], dtype=object),
        "embedding": np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32),
    }
    for name in FEATURE_NAMES:
        batch[name] = np.full(n, 64 if name in ("width", "height") else 0.5)
    part = out / "embeddings" / "part-0.parquet"
    storage.write_parquet(embedding_table(batch, spec).drop_columns(list(drop)), str(part))
    return out


def write_unit_rows(
    dst: str, uris: list[str], ids: list[str], *, dim: int = 64, rng: Any = None
) -> None:
    """One part under ``dst/embeddings`` as keeper embed writes it (its own ``write_batch``):
    a unit row of random direction per URI, random sizes (64-4000 px) and quality features."""
    import numpy as np

    from keeper_core import storage
    from keeper_core.quality import FEATURE_NAMES
    from keeper_train.jobs.embed import write_batch

    rng = rng if rng is not None else np.random.default_rng(0)
    n = len(uris)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    batch: dict[str, Any] = {
        "image_uri": np.array(uris, dtype=object),
        "image_id": np.array(ids, dtype=object),
        "embedding": emb,
        "t_decode": np.zeros(n),
        "t_embed": np.zeros(n),
    }
    for name in FEATURE_NAMES:
        batch[name] = rng.integers(64, 4000, n) if name in ("width", "height") else rng.random(n)
    write_batch(batch, spec="keeper-tiny:random", embeddings_dir=storage.join(dst, "embeddings"))


def write_unit_parts(dst: str, sizes: list[int], *, offset: int = 0, dim: int = 64) -> None:
    """Parts under ``dst/embeddings`` (:func:`write_unit_rows`): part ``p`` (from ``offset``)
    holds ``sizes[p]`` rows, URIs ``s3://photos/{p}/{i}.jpg``."""
    import numpy as np

    rng = np.random.default_rng(offset)
    for p, n in enumerate(sizes, start=offset):
        uris = [f"s3://photos/{p}/{i}.jpg" for i in range(n)]
        write_unit_rows(dst, uris, [f"{p:04x}{i:04x}" for i in range(n)], dim=dim, rng=rng)


def noise_jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A JPEG of seeded noise, ``size`` (width, height)."""
    import io

    import numpy as np
    from PIL import Image

    w, h = size
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_at_bytes_path(path: bytes, data: bytes) -> None:
    """Write ``data`` at a path given as bytes: a file whose name is not UTF-8, as an old
    archive's Latin-1 names are on Linux (parents made)."""
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def xmp_packet(rating: int | None = 4, label: str | None = "Red", *, padding: int = 64) -> bytes:
    """An XMP packet as Lightroom embeds one in a file (or writes a sidecar): the xpacket wrapper,
    ``xmp:Rating`` / ``xmp:Label`` as attributes (left out when None), ``padding`` spaces."""
    props = "".join(
        f' xmp:{k}="{v}"' for k, v in (("Rating", rating), ("Label", label)) if v is not None
    )
    return (
        b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        b'xmlns:xmp="http://ns.adobe.com/xap/1.0/"' + props.encode() + b"/></rdf:RDF>"
        b"</x:xmpmeta>\n" + b" " * padding + b'\n<?xpacket end="w"?>'
    )


PICK_RANKER = "keeper-ranker v3 (models:/keeper-ranker/3)"


def pick_image_id(i: int) -> str:
    """The ``image_id`` of the ``i``-th image :func:`write_pick_run` writes."""
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def write_pick_run(
    folder: Path,
    sizes: list[int],
    *,
    thumbs: int | None = None,
    thumb: Callable[[str], bytes] | None = None,
    finished: str = "2026-12-01T10:00:00Z",
    status: str = "ok",
) -> list[str]:
    """A ``keeper pick`` output (``_SUMMARY.json``, ``picks.parquet``, ``thumbs/xx/<id>.jpg``)
    of groups of ``sizes``, the first of each kept; thumbnails of the first ``thumbs`` images
    (all by default), each ``thumb(image_id)`` (default: a few bytes naming it). Returns the
    image ids in file order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from keeper_core.contact_sheet import thumbnail_name
    from keeper_core.quality import FEATURE_NAMES

    rows: dict[str, list[Any]] = {c: [] for c in ("group_id", "rank", "decision")}
    for g, size in enumerate(sizes):
        for k in range(size):
            rows["group_id"].append(f"g{g:05d}")
            rows["rank"].append(k + 1)
            rows["decision"].append("keep" if k == 0 else "reject")
    n = len(rows["rank"])
    ids = [pick_image_id(i) for i in range(n)]
    cols: dict[str, Any] = {
        **rows,
        "rating": [5 if d == "keep" else 1 for d in rows["decision"]],
        "label": [None] * n,
        "score": [float(-r) for r in rows["rank"]],
        "reasons": [["sharpest"] if d == "keep" else ["blurred"] for d in rows["decision"]],
        "image_uri": [f"/photos/IMG_{i:05d}.JPG" for i in range(n)],
        "file_name": [f"IMG_{i:05d}.JPG" for i in range(n)],
        "image_id": ids,
        "capture_time": [f"2026-05-01T10:00:{i % 60:02d}" for i in range(n)],
        "duplicate_of": [None] * n,
        **{f: np.full(n, 0.5) for f in FEATURE_NAMES},
    }
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), folder / "picks.parquet")
    for i in ids[: n if thumbs is None else thumbs]:
        path = folder / thumbnail_name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(thumb(i) if thumb is not None else b"\xff\xd8jpeg " + i.encode())
    summary = {
        "status": status,
        "ranker": PICK_RANKER,
        "clip_model": "keeper-tiny:random",
        "random_weights": True,
        "finished": finished,
        "picks_sha256": hashlib.sha256((folder / "picks.parquet").read_bytes()).hexdigest(),
    }
    (folder / "_SUMMARY.json").write_text(json.dumps(summary))
    return ids


def check_select_accounting(out: dict[str, Any], n: int) -> None:
    """A /v1/select answer for ``n`` candidates accounts for every one: the stages in order,
    each taking what the one before kept, ``n_in = n_kept + n_dropped``, one pick per image the
    last stage kept."""
    from keeper_core.cascade import STAGES

    stages = out["stages"]
    assert [s["name"] for s in stages] == list(STAGES)
    assert stages[0]["n_in"] == n
    for before, stage in itertools.pairwise(stages):
        assert stage["n_in"] == before["n_kept"]
    for s in stages:
        assert s["n_in"] == s["n_kept"] + s["n_dropped"]
    assert len(out["picks"]) == stages[-1]["n_kept"]


def register_tiny_variant(folder: Path, arch: str, **changes: Any) -> str:
    """Register with open_clip (this process) an arch ``arch``: keeper-tiny's config with
    ``changes`` applied (a top-level key, or ``text_cfg`` / ``vision_cfg`` dicts merged into
    keeper-tiny's own); its config file goes in ``folder``. Returns ``ARCH:random``. An arch
    whose name holds "siglip" would make open_clip fetch SigLIP's tokenizer: avoid it."""
    from importlib import resources

    import open_clip

    tiny = resources.files("keeper_core") / "model_configs" / "keeper-tiny.json"
    cfg = json.loads(tiny.read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if key.endswith("_cfg") and key in cfg else value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return f"{arch}:random"
