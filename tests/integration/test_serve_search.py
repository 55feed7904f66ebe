"""``POST /v1/search`` over real HTTP: a table embedded by the embed job's stages, indexed by
``keeper index``, served by the app with ``search`` configured (``poll_s`` 1 s).

Text, image and image_id queries, filters, auth and the JSON errors; then the index grows (new
rows embedded into the table, ``keeper index`` saves to the same URI) while clients query
continuously: no request fails and the new rows become findable within a few polls.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from support import embed_files, small_app_overrides
from test_serve import TOKEN, call, check_examples, section_examples, wait_until

from keeper_core import storage
from keeper_core.synthetic import PHOTOS, load_photos
from keeper_train.jobs import embed
from keeper_train.jobs import index as index_job

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
SPEC = "keeper-tiny:random"
FIRST = 12  # photos in the first index; the rest arrive with the grown one
MAX_K = 8
REPO = Path(__file__).resolve().parents[2]


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def add_to_table(root: str, files: dict[str, bytes]) -> str:
    """Files under ``root``/photos, embedded into one new part of ``root``/table."""
    return embed_files(root, files, spec=SPEC, capture=False)


@dataclass
class Library:
    root: Path
    table: str
    files: dict[str, bytes]  # every photo, the first FIRST in the table at the start

    def rows(self) -> pd.DataFrame:
        return storage.read_parquet(storage.join(self.table, embed.EMBEDDINGS)).to_pandas()


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    root = tmp_path_factory.mktemp("search-lib")
    files = {f"{n}.jpg": jpeg(im) for n, im in load_photos(PHOTOS).items()}
    table = add_to_table(str(root), dict(list(files.items())[:FIRST]))
    s = index_job.run(index_job.IndexConfig(table=table))
    assert (s.rows, s.backend) == (FIRST, "exact")
    return Library(root, table, files)


@pytest.fixture(scope="module")
def app(
    shared_serve: int, ray_cluster: str, library: Library, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from keeper_serve import local

    d = tmp_path_factory.mktemp("search-serve")
    (d / "token").write_text(TOKEN)
    overrides = small_app_overrides(
        d,
        SPEC,
        **{
            "search": {"index": f"{library.table}/index", "poll_s": 1.0, "max_k": MAX_K},
            "deployments.SearchIndex.ray_actor_options.num_cpus": 0.25,
        },
    )
    url = local.start(overrides=overrides, port=shared_serve, wait_s=240)
    try:
        yield url
    finally:
        local.shutdown()


def search(url: str, body: dict[str, Any], **kw: Any) -> Any:
    return call(url, "POST", "/v1/search", body, **kw)


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def check_results(body: dict[str, Any], k: int) -> list[dict[str, Any]]:
    res = body["results"]
    assert len(res) == k, body
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0001 <= s <= 1.0001 for s in scores)
    assert body["model"] == SPEC
    return list(res)


# ----------------------------------------------------------------------------- tests


def test_text_image_and_image_id_queries(app: str, library: Library) -> None:
    rows = library.rows()
    r = search(app, {"text": "a cat on a sofa", "k": 5, "request_id": "r-1"})
    assert r.status == 200, r.body
    assert r.body["request_id"] == "r-1"
    assert r.body["index"]["count"] == FIRST
    hits = check_results(r.body, 5)
    assert len({h["image_uri"] for h in hits}) == 5
    by_uri = rows.set_index("image_uri")
    for h in hits:  # the table's own rows, sizes included
        assert h["image_id"] == by_uri.loc[h["image_uri"], "image_id"]
        assert (h["width"], h["height"]) == tuple(by_uri.loc[h["image_uri"], ["width", "height"]])

    row = rows.iloc[3]
    r = search(app, {"image_id": row["image_id"], "k": MAX_K})
    assert r.status == 200, r.body
    first = check_results(r.body, MAX_K)[0]
    assert first["image_uri"] == row["image_uri"]
    assert first["score"] == pytest.approx(1.0, abs=2e-3)  # stored as float16 in the replica

    name = Path(row["image_uri"]).name
    r = search(app, {"image": b64(library.files[name]), "k": 3})
    assert r.status == 200, r.body
    first = check_results(r.body, 3)[0]
    assert first["image_uri"] == row["image_uri"]  # prepared as keeper embed prepares it
    assert first["score"] == pytest.approx(1.0, abs=2e-3)


def test_filters(app: str, library: Library) -> None:
    rows = library.rows()
    cut = int(np.median(rows["width"]))
    wide = set(rows.loc[rows["width"] >= cut, "image_uri"])
    body = {"text": "a photo", "k": MAX_K, "filters": {"min_width": cut}}
    r = search(app, body)
    assert r.status == 200, r.body
    got = [h["image_uri"] for h in r.body["results"]]
    assert set(got) <= wide
    assert len(got) == min(MAX_K, len(wide))
    assert all(h["width"] >= cut for h in r.body["results"])
    assert r.body["truncated_by_filters"] == (len(wide) < MAX_K)

    sharp = float(np.quantile(rows["sharpness"], 0.75))
    r = search(app, {"text": "a photo", "k": 2, "filters": {"min": {"sharpness": sharp}}})
    assert r.status == 200, r.body
    keep = set(rows.loc[rows["sharpness"] >= sharp, "image_uri"])
    assert {h["image_uri"] for h in r.body["results"]} <= keep
    assert len(r.body["results"]) == min(2, len(keep))

    r = search(app, {"text": "a photo", "k": 3, "filters": {"max_height": 1}})
    assert (r.status, r.body["results"], r.body["truncated_by_filters"]) == (200, [], True)
    r = search(app, {"text": "a photo", "k": 3, "filters": {"min": {"nope": 1}}})
    assert (r.status, r.body["error"]["code"]) == (422, "invalid_request"), r.body
    assert "nope" in r.body["error"]["message"]


def test_auth_and_json_errors(app: str, library: Library) -> None:
    row = library.rows().iloc[0]
    r = search(app, {"text": "a cat", "k": 2}, token=None)
    assert (r.status, r.body["error"]["code"]) == (401, "unauthorized")
    r = search(app, {"text": "a cat", "k": 2}, token="wrong-token-" + "y" * 20)
    assert r.status == 401
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"text": "a cat", "image_id": row["image_id"]}, 400, "one_query", "text, image_id"),
        ({"k": 3}, 400, "one_query", "none"),
        ({"text": "a cat", "k": 0}, 400, "k_out_of_range", "k=0"),
        ({"text": "a cat", "k": MAX_K + 1}, 400, "k_out_of_range", f"1..{MAX_K}"),
        ({"image_id": "no-such-id", "k": 2}, 400, "unknown_id", "no-such-id"),
        ({"text": " ", "k": 2}, 422, "invalid_request", "text[0] is empty"),
        ({"image": {"b64": "not base64!"}, "k": 2}, 400, "invalid_base64", "image 0"),
        ({"text": "a cat", "colour": "red"}, 422, "invalid_request", "colour"),
    ]
    for body, status, code, words in cases:
        r = search(app, body)
        assert (r.status, r.body["error"]["code"]) == (status, code), (body, r.body)
        assert words in r.body["error"]["message"], (body, r.body)
    r = call(app, "POST", "/v1/search", raw=b"text=a", ctype="multipart/form-data; boundary=x")
    assert (r.status, r.body["error"]["code"]) == (415, "unsupported_media_type")


def test_documented_search_examples_run(app: str, library: Library, tmp_path: Path) -> None:
    """docs/http-api.md's ``/v1/search`` examples (```shell blocks: test_serve runs the ```bash
    ones against an app without search) with their statuses and response shapes."""
    examples = section_examples("### `POST /v1/search`", "/v1/search")
    assert len(examples) >= 2
    (tmp_path / "photo.jpg").write_bytes(next(iter(library.files.values())))
    check_examples(app, examples, tmp_path)


def test_a_grown_index_is_swapped_in_under_load_with_no_failures(
    app: str, library: Library
) -> None:
    results: list[tuple[int, int]] = []  # (status, index count)
    failures: list[Any] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            r = search(app, {"text": "a dog in the snow", "k": 4}, timeout=30)
            if r.status != 200 or len(r.body.get("results", [])) != 4:
                failures.append((r.status, r.body))
            results.append((r.status, r.body.get("index", {}).get("count", -1)))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 5, 30, "requests before the swap")
        new = dict(list(library.files.items())[FIRST:])
        add_to_table(str(library.root), new)
        grown = index_job.run(index_job.IndexConfig(table=library.table))
        assert (grown.added, grown.rows) == (len(new), len(library.files))
        published = time.monotonic()
        wait_until(
            lambda: any(c == len(library.files) for _, c in results[-4:]), 15, "the grown index"
        )
        swap_s = time.monotonic() - published
        n_swap = len(results)
        wait_until(lambda: len(results) >= n_swap + 5, 30, "requests after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=35)
    assert not failures, f"{len(failures)} of {len(results)} failed: {failures[:3]}"
    counts = [c for _, c in results]
    assert counts[-1] == len(library.files)
    assert swap_s < 1.0 + 10, swap_s  # poll_s + a load, with margin for a busy machine
    # A new photo is findable by its own id, and by its pixels, as its own best match.
    rows = library.rows()
    row = rows[rows["image_uri"].str.endswith(next(iter(new)))].iloc[0]
    r = search(app, {"image_id": row["image_id"], "k": 1})
    assert r.status == 200, r.body
    assert r.body["results"][0]["image_uri"] == row["image_uri"]
    r = search(app, {"image": b64(new[Path(row["image_uri"]).name]), "k": 1})
    assert r.body["results"][0]["image_uri"] == row["image_uri"]
