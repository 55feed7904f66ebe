"""The review page (``/ui``) in a real browser: Debian's chromium, driven by playwright, against
the app serving a real ``keeper pick`` run on the session's local Ray.

A wrong token is refused on the form; the right one shows the run's groups with thumbnails that
decode; ``k``, ``a`` and ``u`` on focused tiles land ``picked-as-keeper``, ``accepted`` and
``undone`` rows (with the run's request_id, the group and the reviewer's name) in the feedback
log, where ``decisions`` leaves the keeper standing and the accept taken back; ``?page_size=``
pages the run with ``#next`` and ``p``, decisions kept across pages; the token stays in
sessionStorage and out of every URL; and the page runs under its CSP with no violation.

Query mode, over the same run's embedding table as the app's corpus and search index: a typed
query shows the ``/v1/select`` answer as one group (the picks first, every thumbnail decoded,
the mode and query kept in the URL's hash), and ``k`` lands a ``picked-as-keeper`` with the
answer's request_id, the corpus image_id and the query as group, joined by the server's
``select`` offer row.

Skipped only with ``KEEPER_SKIP_BROWSER=1``; a missing chromium or playwright fails (``make setup``
installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import small_app_overrides
from test_serve import TOKEN, call, check_examples, section_examples

from keeper_core import storage
from keeper_core.contact_sheet import thumbnail_name
from keeper_core.errors import StorageError
from keeper_core.feedback import decisions, read_feedback
from keeper_core.synthetic_library import generate_library

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        os.environ.get("KEEPER_SKIP_BROWSER") == "1", reason="KEEPER_SKIP_BROWSER=1"
    ),
]
SPEC = "keeper-tiny:random"
RUN = "demo"
QUERY = "a dog on a beach"  # group_id of query mode's one group
QUERY_OPTION = "#query"  # app.js's value of the run list's query-mode entry
TOKEN_KEY = "keeper.review.token"  # app.js's sessionStorage key
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DASH = "\N{EN DASH}"  # #page-info: "groups 1-50 of 1,234" with an en dash
WAIT_MS = 20_000  # every playwright wait is bounded by this


def chromium_path() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "no chromium at /usr/bin/chromium nor on PATH: `make setup` installs it "
        "(or set KEEPER_SKIP_BROWSER=1 to skip the review page's browser test)",
        pytrace=False,
    )


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("review-feedback") / "root")


@pytest.fixture(scope="module")
def pick_output(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real ``keeper pick`` run (zero-shot) over a small generated camera library."""
    from keeper_train.jobs import pick

    d = tmp_path_factory.mktemp("review-pick")
    generate_library(d / "library", n_bursts=6, seed=16, image_size=(160, 120))
    out = d / "out"
    pick.run(
        pick.PickJobConfig(
            input=str(d / "library"),
            output=str(out),
            zero_shot=True,
            xmp="none",
            ray_address=ray_cluster,
        )
    )
    return str(out)


@pytest.fixture(scope="module")
def corpus(pick_output: str) -> str:
    """The pick run's embedding table, indexed: the app's corpus and search index."""
    from keeper_train.jobs import index as index_job

    summary = json.loads(Path(pick_output, "_SUMMARY.json").read_text())
    table = str(summary["table"])
    s = index_job.run(index_job.IndexConfig(table=table, backend="exact"))
    assert s.rows >= 20, s
    return table


@pytest.fixture(scope="module")
def app(
    shared_serve: int,
    ray_cluster: str,
    root: str,
    pick_output: str,
    corpus: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    from keeper_serve import local

    d = tmp_path_factory.mktemp("review-serve")
    (d / "token").write_text(TOKEN)
    overrides = small_app_overrides(
        d,
        SPEC,
        feedback={"root": root, "max_age_s": 3},
        review={"runs": {RUN: pick_output}},
        corpus=corpus,
        search={"index": f"{corpus}/index"},
        **{"deployments.SearchIndex.ray_actor_options.num_cpus": 0.25},
    )
    url = local.start(overrides=overrides, port=shared_serve, wait_s=240)
    try:
        yield url
    finally:
        local.shutdown()


@pytest.fixture(scope="module")
def run_info(app: str) -> dict[str, Any]:
    r = call(app, "GET", "/v1/review/runs")
    assert r.status == 200, r.body
    (run,) = [x for x in r.body["runs"] if x["name"] == RUN]
    assert run["error"] is None, run
    assert run["groups"] >= 4, run  # enough groups to page by 2
    return run


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"playwright is not installed ({e}): `make setup` installs it", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """One page in a fresh browser context (its own sessionStorage), with what it saw: every
    request URL, every /v1 answer's status, console errors and CSP violations."""

    def __init__(self, browser: Browser, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.urls: list[str] = []
        self.answers: list[tuple[str, int]] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("response", lambda r: self.answers.append((r.url, r.status)))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", self._console)
        self.base = url

    def _console(self, msg: Any) -> None:
        # A refused token or a missing favicon logs a failed load: expected, not a page error.
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            self.errors.append(msg.text)

    def open(self, query: str = "") -> Page:
        r = self.page.goto(f"{self.base}/ui{query}")
        assert r is not None
        assert r.status == 200, r.status
        csp = r.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp, csp
        assert "style-src 'self'" in csp, csp
        return self.page

    def sign_in(self, token: str, client: str = "") -> None:
        self.page.fill("#token", token)
        self.page.fill("#client", client)
        self.page.click("#login button[type=submit]")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Browser, app: str) -> Iterator[Tab]:
    t = Tab(browser, app)
    try:
        yield t
        assert not t.errors, t.errors  # CSP violations and script errors show up here
    finally:
        t.close()


def focused(page: Page) -> dict[str, str]:
    return dict(
        page.eval_on_selector(
            ".tile.focus",
            "t => ({image: t.dataset.imageId, group: t.dataset.groupId, state: t.dataset.state})",
        )
    )


def text(page: Page, selector: str) -> str:
    return page.text_content(selector) or ""


def tile_state(page: Page, image_id: str) -> str:
    return str(page.get_attribute(f'.tile[data-image-id="{image_id}"]', "data-state"))


def wait_saved(page: Page, image_id: str, state: str) -> None:
    """The tile shows ``state`` and no POST of it is pending or failed."""
    page.wait_for_function(
        """([id, state]) => {
            const t = document.querySelector(`.tile[data-image-id="${id}"]`);
            return t && t.dataset.state === state && !t.classList.contains("pending")
                && !t.classList.contains("unsaved");
        }""",
        arg=[image_id, state],
    )


def group_ids(page: Page) -> list[str]:
    return list(page.eval_on_selector_all(".group", "gs => gs.map(g => g.dataset.groupId)"))


def wait_thumbs_decoded(page: Page) -> None:
    """Every tile in the viewport shows a decoded thumbnail."""
    page.wait_for_function(
        """() => {
            const seen = [...document.querySelectorAll('.tile')].filter(t => {
                const r = t.getBoundingClientRect();
                return r.bottom > 0 && r.top < innerHeight;
            });
            return seen.length > 0 && seen.every(t => {
                const img = t.querySelector('img');
                return img && img.complete && img.naturalWidth > 0;
            });
        }"""
    )


def feedback_rows(root: str, request_id: str, client: str) -> list[dict[str, Any]]:
    try:
        t = read_feedback(storage.join(root, "events"))
    except StorageError:  # nothing written yet
        return []
    return [r for r in t.to_pylist() if r["request_id"] == request_id and r["client"] == client]


# ----------------------------------------------------------------------------- tests


def test_page_loads_and_a_wrong_token_is_refused(tab: Tab) -> None:
    page = tab.open()
    assert page.is_visible("#login")
    assert page.is_hidden("#review-view")
    tab.sign_in("wrong-token-" + "z" * 24)
    page.wait_for_selector("#login-error:visible")
    assert "token refused" in text(page, "#login-error").lower()
    assert page.is_hidden("#review-view")
    review = [(u, s) for u, s in tab.answers if "/v1/review/" in u]
    assert review
    assert all(s == 401 for _, s in review), review
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None


def test_contact_sheet_shows_the_runs_groups_and_thumbnails(
    tab: Tab, app: str, run_info: dict[str, Any]
) -> None:
    page = tab.open()
    tab.sign_in(TOKEN)
    page.wait_for_selector(".tile.focus")
    first = call(app, "GET", f"/v1/review/runs/{RUN}/groups?offset=0&limit=50").body
    assert group_ids(page) == [g["group_id"] for g in first["groups"]]
    tiles = page.eval_on_selector_all(".tile", "ts => ts.map(t => t.dataset.imageId)")
    assert tiles == [im["image_id"] for g in first["groups"] for im in g["images"]]
    assert len(tiles) == run_info["images"]
    assert page.get_attribute(".tile.focus", "data-image-id") == tiles[0]  # first tile focused
    total = run_info["groups"]
    assert text(page, "#page-info") == f"groups 1{DASH}{min(total, 50)} of {total}"
    assert run_info["ranker"] in text(page, "#ranker")
    assert run_info["clip_model"] in text(page, "#clip-model")
    assert run_info["random_weights"] is True
    assert page.is_visible("#weights-warning")
    assert "random weights: scores are noise" in text(page, "#weights-warning")
    for g in first["groups"]:  # the model's keeper of each group is marked
        if g["keeper"]:
            assert page.is_visible(f'.tile.model-keeper[data-image-id="{g["keeper"]}"]')
    wait_thumbs_decoded(page)  # named by its file:
    alts = page.eval_on_selector_all(".tile img", "is => is.map(i => i.alt)")
    names = {im["file_name"] for g in first["groups"] for im in g["images"]}
    assert alts
    assert set(alts) <= names
    thumbs = [u for u in tab.urls if "/thumbs/" in u]
    assert thumbs
    assert all(s == 200 for u, s in tab.answers if "/thumbs/" in u)


def test_keys_land_decisions_in_the_feedback_log(
    tab: Tab, root: str, run_info: dict[str, Any]
) -> None:
    client = "reviewer-ann"
    page = tab.open()
    tab.sign_in(TOKEN, client)
    page.wait_for_selector(".tile.focus")
    keeper = focused(page)
    page.keyboard.press("k")
    wait_saved(page, keeper["image"], "picked-as-keeper")
    assert "keeper" in (
        page.get_attribute(f'.tile[data-image-id="{keeper["image"]}"]', "class") or ""
    )
    other = focused(page)  # a decision moves the focus to the next tile
    assert other["image"] != keeper["image"]
    page.keyboard.press("a")
    wait_saved(page, other["image"], "accepted")
    page.keyboard.press("u")  # takes back the accept, not the keeper
    wait_saved(page, other["image"], "")
    assert tile_state(page, keeper["image"]) == "picked-as-keeper"
    assert focused(page)["image"] == other["image"]  # undo returns to the tile it changed
    page.wait_for_function(
        "() => /2 decisions saved/.test(document.querySelector('#status').textContent)"
    )

    request_id = run_info["request_id"]
    deadline = time.monotonic() + 10
    rows = feedback_rows(root, request_id, client)
    while len(rows) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = feedback_rows(root, request_id, client)
    got = [(r["image_id"], r["action"], r["group_id"]) for r in rows]
    assert got == [
        (keeper["image"], "picked-as-keeper", keeper["group"]),
        (other["image"], "accepted", other["group"]),
        (other["image"], "undone", other["group"]),
    ], got
    events = read_feedback(storage.join(root, "events"))
    standing = [
        (r["image_id"], r["action"])
        for r in decisions(events).to_pylist()
        if r["request_id"] == request_id and r["client"] == client
    ]
    assert standing == [(keeper["image"], "picked-as-keeper")], standing


def standing_keepers(root: str, request_id: str, client: str) -> list[str]:
    events = read_feedback(storage.join(root, "events"))
    return [
        r["image_id"]
        for r in decisions(events).to_pylist()
        if r["request_id"] == request_id and r["client"] == client
        and r["action"] == "picked-as-keeper"
    ]  # fmt: skip


def test_a_new_keeper_takes_back_the_old_one(tab: Tab, root: str, run_info: dict[str, Any]) -> None:
    """One keeper a group on the server too: ``k`` on a second shot sends ``undone`` for the
    first (keeper feedback-export refuses a group with two), and undo makes the first the
    keeper again."""
    client = "reviewer-bo"
    page = tab.open()
    tab.sign_in(TOKEN, client)
    page.wait_for_selector(".tile.focus")
    first, second = page.eval_on_selector_all(
        ".group",
        "gs => { const g = gs.find(g => g.querySelectorAll('.tile').length >= 2);"
        " return [...g.querySelectorAll('.tile')].slice(0, 2).map(t => t.dataset.imageId); }",
    )
    page.click(f'.tile[data-image-id="{first}"]')
    page.keyboard.press("k")
    wait_saved(page, first, "picked-as-keeper")
    page.click(f'.tile[data-image-id="{second}"]')
    page.keyboard.press("k")
    wait_saved(page, second, "picked-as-keeper")
    assert tile_state(page, first) == ""
    request_id = run_info["request_id"]
    deadline = time.monotonic() + 10
    while len(feedback_rows(root, request_id, client)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert standing_keepers(root, request_id, client) == [second]
    page.keyboard.press("u")
    wait_saved(page, first, "picked-as-keeper")
    deadline = time.monotonic() + 10
    while len(feedback_rows(root, request_id, client)) < 5 and time.monotonic() < deadline:
        time.sleep(0.5)
    got = [(r["image_id"], r["action"]) for r in feedback_rows(root, request_id, client)]
    assert got == [
        (first, "picked-as-keeper"),
        (first, "undone"),
        (second, "picked-as-keeper"),
        (second, "undone"),
        (first, "picked-as-keeper"),
    ], got
    assert standing_keepers(root, request_id, client) == [first]


def test_review_decisions_export_as_training_series(
    root: str, run_info: dict[str, Any], pick_output: str, tmp_path: Path
) -> None:
    """The decisions made above (reviewer-ann's keeper, reviewer-bo's keeper after the undo)
    become a keeper series that train-head takes: the offers the page logged carry each image's
    embedding and quality features from the run's tables."""
    import pandas as pd

    from keeper_core.feedback import read_offers
    from keeper_train.jobs import feedback_export

    def on_disk() -> bool:  # the replica writes offers and events when max_age_s old
        try:
            offers = read_offers(storage.join(root, "offers"))
            events = read_feedback(storage.join(root, "events"))
        except StorageError:
            return False
        ours = {run_info["request_id"]}
        return bool(ours & set(offers.column("request_id").to_pylist())) and bool(
            ours & set(events.column("request_id").to_pylist())
        )

    # max_age_s is 3 s; a loaded 2-core host has taken over 15 s to flush both logs.
    deadline = time.monotonic() + 90
    while not on_disk():
        assert time.monotonic() < deadline, "the review's offers and events never reached disk"
        time.sleep(0.5)
    summary = feedback_export.run(
        feedback_export.FeedbackExportConfig(
            feedback=root, output=str(tmp_path / "export"), routes=["review"]
        )
    )
    assert summary.decisions == summary.used + sum(summary.skipped.values()), summary
    # Both reviewers' keepers stand; the two groups overlap (the same burst), and a manifest
    # names an image once, so one becomes a series and the other is counted, not lost.
    assert summary.decisions == 2, summary
    assert (summary.series, summary.skipped["image_in_other_series"]) == (1, 1), summary
    assert summary.finetune_ready, summary  # every image at its library path
    assert summary.offers_left_out == 0, summary  # every offered image had its embedding
    series = pd.read_csv(tmp_path / "export" / "series.csv")
    keepers = set(series.loc[series["is_best"].astype(bool), "image_uri"])
    picks = pd.read_parquet(Path(pick_output) / "picks.parquet")
    uri = dict(zip(picks["image_id"], picks["image_uri"], strict=True))
    events = read_feedback(storage.join(root, "events"))
    standing = {
        uri[r["image_id"]]
        for r in decisions(events).to_pylist()
        if r["request_id"] == run_info["request_id"] and r["action"] == "picked-as-keeper"
    }
    assert len(keepers) == 1, keepers
    assert keepers <= standing, (keepers, standing)


def test_pages_of_a_run_and_decisions_across_pages(
    tab: Tab, app: str, run_info: dict[str, Any]
) -> None:
    total = run_info["groups"]
    page = tab.open("?page_size=2")
    tab.sign_in(TOKEN, "reviewer-pager")
    page.wait_for_selector(".tile.focus")
    assert text(page, "#page-info") == f"groups 1{DASH}2 of {total}"
    assert page.is_disabled("#prev")
    assert page.is_enabled("#next")
    first = group_ids(page)
    assert len(first) == 2
    rejected = focused(page)["image"]
    page.keyboard.press("x")
    wait_saved(page, rejected, "rejected")

    page.click("#next")
    page.wait_for_function(
        f"() => document.querySelector('#page-info').textContent === 'groups 3{DASH}4 of {total}'"
    )
    second = call(app, "GET", f"/v1/review/runs/{RUN}/groups?offset=2&limit=2").body
    assert group_ids(page) == [g["group_id"] for g in second["groups"]]
    assert (
        page.get_attribute(".tile.focus", "data-image-id")
        == (second["groups"][0]["images"][0]["image_id"])
    )
    page.keyboard.press("ArrowDown")  # the next group's first tile
    assert focused(page)["group"] == second["groups"][1]["group_id"]

    page.keyboard.press("p")
    page.wait_for_function(
        f"() => document.querySelector('#page-info').textContent === 'groups 1{DASH}2 of {total}'"
    )
    assert group_ids(page) == first
    assert tile_state(page, rejected) == "rejected"  # the decision is kept across pages
    page.keyboard.press("?")
    assert page.is_visible("#help")
    assert "undo" in text(page, "#help")
    page.keyboard.press("?")
    assert page.is_hidden("#help")


def test_token_stays_in_session_storage_and_out_of_urls(tab: Tab) -> None:
    page = tab.open()
    tab.sign_in(TOKEN)
    page.wait_for_selector(".tile.focus")
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    page.reload()  # sessionStorage signs the tab in again
    page.wait_for_selector(".tile.focus")
    assert tab.urls
    assert not [u for u in [*tab.urls, page.url] if TOKEN in u]
    page.click("#logout")
    page.wait_for_selector("#login:visible")
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None


def test_documented_review_examples(app: str, run_info: dict[str, Any], tmp_path: Path) -> None:
    """docs/http-api.md's review examples, run as written against this app's run ``demo``."""
    examples = section_examples("### The review routes", "/v1/review", end="\n### ")
    assert len(examples) == 4, [e.where for e in examples]
    check_examples(app, examples, tmp_path)


def test_review_routes_refuse_what_they_must(
    app: str, run_info: dict[str, Any], pick_output: str
) -> None:
    """No token, a foreign image id, a path-like id, a page out of range: JSON errors, no data."""
    base = f"/v1/review/runs/{RUN}"
    assert call(app, "GET", f"{base}/groups", token=None).status == 401
    r = call(app, "GET", f"{base}/thumbs/{'0' * 64}")
    assert (r.status, r.body["error"]["code"]) == (404, "unknown_image"), r.body
    r = call(app, "GET", f"{base}/thumbs/..%2F..%2F_SUMMARY.json")
    assert r.status == 404, r.body
    assert "run_id" not in r.body, r.body  # a JSON error, never the summary's bytes
    assert set(r.body) == {"error"}, r.body
    # A thumbnail gone from the run's folder since it loaded: 404, and the message names no
    # server path (the log does).
    groups = call(app, "GET", f"{base}/groups?limit=1").body["groups"]
    image_id = groups[0]["images"][0]["image_id"]
    thumb = Path(pick_output, thumbnail_name(image_id))
    aside = thumb.with_suffix(".aside")
    thumb.rename(aside)
    try:
        r = call(app, "GET", f"{base}/thumbs/{image_id}")
    finally:
        aside.rename(thumb)
    assert (r.status, r.body["error"]["code"]) == (404, "unknown_image"), r.body
    assert pick_output not in r.body["error"]["message"], r.body
    assert "<path>" in r.body["error"]["message"], r.body
    r = call(app, "GET", f"{base}/groups?offset={run_info['groups'] + 1}")
    assert (r.status, r.body["error"]["code"]) == (400, "invalid_page"), r.body
    r = call(app, "GET", f"{base}/groups?limit=abc")
    assert r.status == 422, r.body


# ----------------------------------------------------------------------------- query mode


def ask(tab: Tab, client: str = "") -> tuple[Page, list[str], dict[str, Any]]:
    """Sign in, switch the run list to query mode, submit QUERY with Enter: the page, the ids
    it sent /v1/select and the select answer."""
    page = tab.open()
    tab.sign_in(TOKEN, client)
    page.wait_for_selector(".tile.focus")  # a run's sheet first: the app has runs
    page.select_option("#run", QUERY_OPTION)
    page.wait_for_selector("#query:visible")
    assert page.is_hidden("#prev")  # one sheet: no paging
    assert page.is_hidden("#next")
    page.fill("#query", QUERY)
    with page.expect_response(lambda r: r.url.endswith("/v1/select")) as info:
        page.press("#query", "Enter")
    res = info.value
    assert res.status == 200, res.text()
    sent = res.request.post_data_json
    assert sent["positive"] == [QUERY], sent
    assert sent["candidates"] == "all", sent
    assert sent["top_k"] == min(10, len(sent["ids"])), sent
    page.wait_for_selector(".tile.focus")
    return page, list(sent["ids"]), dict(res.json())


def test_query_mode_shows_the_select_answer(
    tab: Tab, app: str, corpus: str, run_info: dict[str, Any]
) -> None:
    r = call(app, "GET", "/v1/review/runs")
    assert r.body["select"]["search"] is True, r.body
    page, ids, answer = ask(tab)
    assert len(ids) == len(set(ids)) == r.body["select"]["corpus_images"]  # k=32 > 23 images
    assert group_ids(page) == [QUERY]
    assert page.get_attribute("#sheet", "data-request-id") == answer["request_id"]
    tiles = page.eval_on_selector_all(".tile", "ts => ts.map(t => t.dataset.imageId)")
    assert sorted(tiles) == sorted(ids[c["index"]] for c in answer["candidates"])
    assert len(tiles) == len(ids)
    picks = [ids[i] for i in answer["picks"]]
    assert 0 < len(picks) <= 10
    assert tiles[: len(picks)] == picks  # the picks first, in pick order
    assert page.get_attribute(".tile.focus", "data-image-id") == picks[0]
    assert page.is_visible(f'.tile.model-keeper[data-image-id="{picks[0]}"]')
    assert page.eval_on_selector_all(".tile.model-keeper", "ts => ts.length") == 1
    dropped = {ids[c["index"]]: c["dropped_at"] for c in answer["candidates"]}
    last = tiles[-1]
    assert dropped[last] is not None
    assert f"out: {dropped[last]}" in text(page, f'.tile[data-image-id="{last}"] .meta')
    assert text(page, "#page-info") == f"{len(ids)} candidates"
    shown = [st for st in answer["stages"] if not st["skipped"]]
    assert text(page, "#stages") == " · ".join(
        f"{st['name']} {st['n_in']}→{st['n_kept']}" for st in shown
    )
    assert answer["models"]["clip_random_weights"] is True
    assert page.is_visible("#weights-warning")
    wait_thumbs_decoded(page)
    corpus_thumbs = [(u, s) for u, s in tab.answers if "/v1/review/corpus/thumbs/" in u]
    assert corpus_thumbs
    assert all(s == 200 for _, s in corpus_thumbs), corpus_thumbs
    assert "#mode=query" in page.url
    assert "q=a+dog+on+a+beach" in page.url, page.url

    page.reload()  # the hash brings the query back: a new answer to the same query
    page.wait_for_selector(".tile.focus")
    assert group_ids(page) == [QUERY]
    assert page.input_value("#query") == QUERY
    reloaded = page.get_attribute("#sheet", "data-request-id")
    assert reloaded not in (None, answer["request_id"])
    assert not [u for u in [*tab.urls, page.url] if TOKEN in u]

    page.select_option("#run", RUN)  # back to the run: its groups, paged
    page.wait_for_function(
        "id => document.querySelector('#sheet').dataset.requestId === id",
        arg=run_info["request_id"],
    )
    assert text(page, "#page-info").startswith(f"groups 1{DASH}")
    assert page.is_visible("#next")
    assert page.is_hidden("#query-form")
    assert QUERY not in group_ids(page)
    asked = sum(u.endswith("/v1/select") for u in tab.urls)
    page.select_option("#run", QUERY_OPTION)  # the answer shown before, not a new one
    page.wait_for_selector(f'.group[data-group-id="{QUERY}"] .tile.focus')
    assert page.get_attribute("#sheet", "data-request-id") == reloaded
    assert sum(u.endswith("/v1/select") for u in tab.urls) == asked


def test_query_mode_decisions_join_the_select_offers(tab: Tab, root: str) -> None:
    from keeper_core.feedback import read_offers

    client = "reviewer-query"
    page, ids, answer = ask(tab, client)
    request_id = answer["request_id"]
    page.keyboard.press("ArrowRight")  # the second pick, not the server's first
    chosen = focused(page)
    assert chosen["image"] == ids[answer["picks"][1]]
    assert chosen["group"] == QUERY
    page.keyboard.press("k")
    wait_saved(page, chosen["image"], "picked-as-keeper")

    deadline = time.monotonic() + 10
    rows = feedback_rows(root, request_id, client)
    while not rows and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = feedback_rows(root, request_id, client)
    got = [(r["image_id"], r["action"], r["group_id"]) for r in rows]
    assert got == [(chosen["image"], "picked-as-keeper", QUERY)], got

    def offers() -> list[dict[str, Any]]:  # written when feedback.max_age_s old
        try:
            t = read_offers(storage.join(root, "offers"))
        except StorageError:
            return []
        return [r for r in t.to_pylist() if r["request_id"] == request_id]

    deadline = time.monotonic() + 15
    offered = offers()
    while not offered and time.monotonic() < deadline:
        time.sleep(0.5)
        offered = offers()
    assert {r["route"] for r in offered} == {"select"}, offered
    assert {r["group_id"] for r in offered} == {QUERY}
    assert sorted(r["image_id"] for r in offered) == sorted(ids)
    (row,) = [r for r in offered if r["image_id"] == chosen["image"]]
    assert (row["offered"], row["rank"]) == ("pick", 1), row
