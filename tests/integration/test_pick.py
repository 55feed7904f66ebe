"""keeper pick end to end on a local Ray: a generated camera library (EXIF times, two bodies,
duplicates, a HEIC, a DNG, a broken file), the zero-shot rule and a trained champion, XMP
sidecars read back with exiv2, originals untouched, kill -9 and re-run."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import register_ranker
from PIL import Image, ImageFilter
from support_photos import camera_exif, make_dng, make_heic

from keeper_core import storage
from keeper_core.contact_sheet import thumbnail_name
from keeper_core.grouping import pairwise_scores
from keeper_core.handback import read_sidecar, write_sidecar
from keeper_core.picking import ZERO_SHOT_RULE
from keeper_core.ranker import SeriesRanker
from keeper_core.synthetic import load_photos
from keeper_core.synthetic_library import generate_library
from keeper_train.data import join_series
from keeper_train.jobs import evaluate, pick, train_head

pytestmark = pytest.mark.integration


def _exif(when: str, subsec: str) -> Image.Exif:
    return camera_exif(when, subsec, make="Apple", model="iPhone 15 Pro")


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """~70 camera JPEGs in bursts + duplicates, a HEIC pair, a DNG, a broken file; the truth."""
    root = tmp_path_factory.mktemp("pick") / "library"
    manifest = generate_library(
        root, n_bursts=14, seed=5, exact_duplicates=2, near_duplicates=1, image_size=(256, 192)
    )
    truth = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    phone = root / "PHONE"
    phone.mkdir()
    # Photos the library does not use, so neither is a duplicate of a library shot.
    photos = load_photos(["coins", "camera"])
    coins = photos["coins"].resize((256, 192))
    for i, sub in enumerate(("100", "250")):  # a two-shot HEIC burst, 150 ms apart
        exif = _exif("2024:05:01 10:00:00", sub)
        shot = coins if i == 0 else coins.filter(ImageFilter.GaussianBlur(2))
        (phone / f"IMG_{i:04d}.HEIC").write_bytes(make_heic(shot, exif=exif.tobytes()))
    (root / "RAW").mkdir()
    make_dng(
        root / "RAW" / "_MG_0001.DNG",
        preview=photos["camera"].resize((256, 192)),
        datetime_original="2024:05:02 09:00:00",
        subsec="5",
        offset="+02:00",
    )
    (root / "RAW" / "BROKEN.JPG").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return root, truth


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_picks(summary: pick.PickSummary) -> pd.DataFrame:
    return storage.read_parquet(summary.outputs["picks_parquet"]).to_pandas()


def truth_bursts(truth: pd.DataFrame) -> pd.DataFrame:
    """Truth rows of bursts of >= 2 shots, planted duplicates left out."""
    t = truth[truth["duplicate_of"] == ""]
    return t[t.groupby("series_id")["series_id"].transform("size") > 1]


def copy_first_burst(truth: pd.DataFrame, folder: Path) -> tuple[Path, pd.DataFrame]:
    """The library's first burst copied into ``folder`` (a shoot of its own); its truth rows."""
    folder.mkdir()
    burst = truth[truth["series_id"] == truth["series_id"].iloc[0]]
    for uri in burst["image_uri"]:
        shutil.copy2(uri, folder / Path(uri).name)
    return folder, burst


def test_zero_shot_pick_end_to_end(
    ray_cluster: str, library: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, truth = library
    before = snapshot(root)
    out = tmp_path / "out"
    cfg = pick.PickJobConfig(
        input=str(root), output=str(out), zero_shot=True, ray_address=ray_cluster
    )
    summary = pick.run(cfg)

    c = summary.counts
    n_files = len(truth) + 4  # + 2 HEIC, the DNG, the broken file
    assert c["in"] == n_files
    assert c["in"] == c["picked"] + c["failed"]
    assert c["lost"] == 0
    failed = pd.read_csv(summary.outputs["failed_csv"])
    assert failed["image_uri"].str.endswith("BROKEN.JPG").tolist() == [True]
    assert failed["reason"].iloc[0] in ("truncated", "not_image")
    assert summary.ranker == ZERO_SHOT_RULE
    assert summary.zero_shot

    picks = read_picks(summary)
    assert picks["image_uri"].is_unique
    assert len(picks) == c["picked"]
    by_name = picks.set_index("file_name")
    # The phone's HEIC pair is one burst from its EXIF times; the DNG is read through its preview.
    heic = picks[picks["file_name"].str.endswith(".HEIC")]
    assert heic["group"].nunique() == 1
    assert set(heic["time_source"]) == {"exif"}
    assert heic["duplicate_kind"].isna().all()
    # The sharp one is kept, the blurred one is not, whatever the (zero-shot) scores' scale.
    assert heic.set_index("file_name")["decision"].to_dict()["IMG_0000.HEIC"] == "keep"
    assert by_name.loc["_MG_0001.DNG", "time_source"] == "exif_offset"
    assert by_name.loc["_MG_0001.DNG", "capture_time"].startswith("2024-05-02T09:00:00.5")
    # One keeper per group at most, and every reject says why.
    keepers = picks[picks["decision"] == "keep"].groupby("group").size()
    assert keepers.max() == 1
    assert all(len(r) > 0 for r in picks.loc[picks["decision"] == "reject", "reasons"])
    # The planted byte copies are marked exact duplicates of their originals.
    planted = truth[truth["duplicate_of"] != ""]
    exact = picks[picks["duplicate_kind"] == "exact"]
    exact_pairs = {
        (storage.same_key(a), storage.same_key(b))
        for a, b in zip(exact["image_uri"], exact["duplicate_of"], strict=True)
    }
    for _, row in planted.iterrows():
        if "/export/web/" in row["image_uri"]:
            continue  # the near copy (resized, EXIF stripped)
        pair = (storage.same_key(row["image_uri"]), storage.same_key(row["duplicate_of"]))
        assert pair in exact_pairs or pair[::-1] in exact_pairs
    # Grouping against the generator's truth (never shown to keeper pick).
    t = truth[truth["duplicate_of"] == ""].assign(_k=lambda d: d["image_uri"].map(storage.same_key))
    both = t.merge(picks.assign(_k=picks["image_uri"].map(storage.same_key)), on="_k")
    assert len(both) == len(t)
    _, _, f1 = pairwise_scores(both["series_id"].tolist(), both["group"].tolist())
    assert f1 >= 0.95

    # XMP sidecars: one per photo (mirrored), parsed by exiv2, rating and label as in the table.
    xmp = out / "xmp"
    sidecars = sorted(xmp.rglob("*.xmp"))
    assert len(sidecars) == summary.sidecars["written"] == c["picked"]
    for _, row in picks.sample(10, random_state=0).iterrows():
        rel = Path(row["image_uri"]).relative_to(root).with_suffix(".xmp")
        fields = read_sidecar(str(xmp / rel))
        assert int(str(fields["Xmp.xmp.Rating"])) == row["rating"]
        assert fields.get("Xmp.xmp.Label") == row["label"]
        assert fields["Xmp.keeper.decision"] == row["decision"]
    # The contact sheet names the rule; thumbnails were written while embedding.
    index = Path(summary.outputs["contact_sheet"]).read_text()
    assert "zero-shot rule" in index
    assert len(list((out / "thumbs").rglob("*.jpg"))) == picks["image_id"].nunique()
    # Originals: not one byte or mtime changed.
    assert snapshot(root) == before

    # A second run embeds nothing and rewrites nothing that is already right.
    again = pick.run(cfg)
    assert again.embed["attempted"] == 0
    assert again.sidecars == {
        "written": 0,
        "unchanged": c["picked"],
        "skipped": 0,
        "kept_ratings": 0,
        "stale_removed": 0,  # the mirror's sidecars are all of photos still picked
    }
    pd.testing.assert_frame_equal(read_picks(again), picks)
    assert snapshot(root) == before


def test_existing_sidecar_beside_the_original_keeps_its_fields(
    ray_cluster: str, library: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    _, truth = library
    shots, burst = copy_first_burst(truth, tmp_path / "shoot")
    first = shots / Path(burst["image_uri"].iloc[0]).name
    sidecar = first.with_suffix(".xmp")
    # What a photo tool left: keywords and a headline; keeper must merge, not replace.
    sidecar.write_text(
        '<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" photoshop:Headline="first dance">'
        "<dc:subject><rdf:Bag><rdf:li>wedding</rdf:li><rdf:li>dance</rdf:li></rdf:Bag>"
        "</dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    )
    # Other files already where the keepers would be copied: each keeper's export is refused,
    # named with its reason in the summary and the sheet, and the run still finishes.
    keepers = tmp_path / "keepers"
    keepers.mkdir()
    for uri in burst["image_uri"]:
        (keepers / Path(uri).name).write_bytes(b"another photo by this name")
    summary = pick.run(
        pick.PickJobConfig(
            input=str(shots),
            output=str(tmp_path / "out"),
            zero_shot=True,
            xmp="beside",
            copy_keepers=str(keepers),
            ray_address=ray_cluster,
        )
    )
    assert summary.status == "ok"
    n_keep = summary.counts["keepers"]
    assert summary.keepers_exported == {
        "exported": 0,
        "already_there": 0,
        "updated": 0,
        "failed": n_keep,
    }
    assert len(summary.export_failures) == n_keep >= 1
    kept = summary.export_failures[0]
    assert Path(kept.image_uri).parent == shots
    assert "different file" in kept.reason
    assert (keepers / Path(kept.image_uri).name).read_bytes() == b"another photo by this name"
    sheet = Path(summary.outputs["contact_sheet"]).read_text()
    assert f"{n_keep} keeper(s) not exported" in sheet
    assert Path(kept.image_uri).name in sheet
    printed = pick.format_summary(summary)
    assert f"{n_keep} failed" in printed
    assert "export_failures" in printed
    fields = read_sidecar(str(sidecar))
    assert fields["Xmp.dc.subject"] == ["wedding", "dance"]
    assert fields["Xmp.photoshop.Headline"] == "first dance"
    picks = read_picks(summary).set_index("file_name")
    assert int(str(fields["Xmp.xmp.Rating"])) == picks.loc[first.name, "rating"]
    assert len(list(shots.glob("*.xmp"))) == len(burst)
    # A later write by keeper still keeps them (the merge is not a one-off).
    write_sidecar(str(sidecar), rating=5, label=None)
    assert read_sidecar(str(sidecar))["Xmp.dc.subject"] == ["wedding", "dance"]


def test_xmp_embed_writes_into_the_jpegs_and_feedback_reads_a_lightroom_change(
    ray_cluster: str, library: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    """`keeper pick --xmp embed` as a Lightroom JPEG shooter runs it: the JPEGs hold keeper's
    XMP themselves (pixels and EXIF as they were), the DNG gets a sidecar beside it, a re-run
    touches nothing, and feedback-from-xmp reads a rating changed in a JPEG as the person's."""
    import pyexiv2

    from keeper_core.cli import main as keeper
    from keeper_core.embedded_xmp import read_embedded_xmp
    from keeper_train.jobs.xmp_feedback import XmpFeedbackConfig
    from keeper_train.jobs.xmp_feedback import run as feedback_from_xmp

    root, truth = library
    shots, burst = copy_first_burst(truth, tmp_path / "shoot")
    shutil.copy2(root / "RAW" / "_MG_0001.DNG", shots / "_MG_0001.DNG")
    jpegs = sorted(shots.glob("*.[jJ][pP][gG]"))
    assert len(jpegs) == len(burst) >= 2
    pixels = {p.name: Image.open(p).tobytes() for p in jpegs}
    exif = {p.name: dict(Image.open(p).getexif()) for p in jpegs}
    as_shot = {p.name: p.read_bytes() for p in jpegs}
    out = tmp_path / "out"
    keepers = tmp_path / "keepers"
    argv = ["pick", "--input", str(shots), "--output", str(out), "--zero-shot", "--xmp", "embed"]
    argv += ["--copy-keepers", str(keepers)]
    assert keeper([*argv, "--ray-address", ray_cluster]) == 0

    summary = pick.PickSummary.model_validate_json((out / "_SUMMARY.json").read_text())
    assert summary.xmp == "embed"
    assert summary.sidecars["files_written"] == len(jpegs)
    assert summary.sidecars["written"] == len(jpegs) + 1  # + the DNG's sidecar
    picks = read_picks(summary).set_index("file_name")
    for p in jpegs:
        fields = read_embedded_xmp(str(p)) or {}
        assert int(str(fields["Xmp.xmp.Rating"])) == picks.loc[p.name, "rating"]
        assert fields["Xmp.keeper.decision"] == picks.loc[p.name, "decision"]
        assert Image.open(p).tobytes() == pixels[p.name]
        assert dict(Image.open(p).getexif()) == exif[p.name]
    assert sorted(f.name for f in shots.glob("*.xmp")) == ["_MG_0001.xmp"]
    assert not (out / "xmp").exists()

    # Again: every file as it was, to the byte and the mtime.
    before = snapshot(shots)
    assert keeper([*argv, "--ray-address", ray_cluster]) == 0
    assert snapshot(shots) == before
    # ... and the JPEGs keeper wrote into are not new photos: the first run gave their rows the
    # stamps it wrote, so this one read none of them, let alone embedded them again.
    rerun = pick.PickSummary.model_validate_json((out / "_SUMMARY.json").read_text()).embed
    assert (rerun["restamped"], rerun["changed"], rerun["attempted"]) == (0, 0, 0)

    # No person has rated anything yet; then one JPEG is rejected in a photo tool (exiv2
    # rewriting the file, as Lightroom's "save metadata to file" does).
    fb = tmp_path / "feedback"
    first = feedback_from_xmp(XmpFeedbackConfig(run=str(out), feedback=str(fb)))
    assert (first.in_jpegs, first.persons_ratings) == (len(jpegs), 0)
    keeper_pick = next(p for p in jpegs if picks.loc[p.name, "decision"] == "keep")
    with pyexiv2.Image(str(keeper_pick)) as img:
        img.modify_xmp({"Xmp.xmp.Rating": "-1"})
    second = feedback_from_xmp(XmpFeedbackConfig(run=str(out), feedback=str(fb)))
    assert second.persons_ratings == 1
    assert second.decisions["rejected"] == 1

    # pick again: the person's rating stays in the file, and keeper's copy of that keeper,
    # which no longer matches its original, is replaced rather than refused.
    assert keeper([*argv, "--ray-address", ray_cluster]) == 0
    again = pick.PickSummary.model_validate_json((out / "_SUMMARY.json").read_text())
    assert again.embed["restamped"] == 1  # a rating saved: the same photo
    assert again.embed["changed"] == 0
    assert again.keepers_exported is not None
    assert (again.keepers_exported["updated"], again.keepers_exported["failed"]) == (1, 0)
    assert (keepers / keeper_pick.name).read_bytes() == keeper_pick.read_bytes()
    assert (read_embedded_xmp(str(keeper_pick)) or {})["Xmp.xmp.Rating"] == "-1"

    # A reject deleted in the photo tool, then pick --prune: its row leaves the table, and the
    # sheet says so (max_prune_fraction=1: one photo of a small burst is over the default 25 %).
    deleted = next(p for p in jpegs if picks.loc[p.name, "decision"] != "keep")
    rows = storage.read_parquet(str(out / "table" / "embeddings")).to_pandas()
    deleted_id = rows.set_index("image_uri").loc[str(deleted), "image_id"]
    shared = (rows["image_id"] == deleted_id).sum() > 1  # an exact copy keeps the thumbnail
    assert (out / thumbnail_name(deleted_id)).exists()
    deleted.unlink()
    assert keeper([*argv, "--prune", "max_prune_fraction=1", "--ray-address", ray_cluster]) == 0
    last = pick.PickSummary.model_validate_json((out / "_SUMMARY.json").read_text())
    assert (last.embed["gone"], last.embed["pruned"], last.embed["attempted"]) == (1, 1, 0)
    table = storage.read_parquet(str(out / "table" / "embeddings")).column("image_uri")
    assert str(deleted) not in table.to_pylist()
    sheet = Path(last.outputs["contact_sheet"]).read_text()
    assert "1 photo(s) of earlier runs no longer in the folder" in sheet
    assert (out / thumbnail_name(deleted_id)).exists() == shared
    assert last.counts["thumbnails_removed"] == int(not shared)

    # keeper unpick: every JPEG no tool wrote into is the file off the card again, the one
    # rejected in the photo tool keeps the person's -1 alone, the DNG's sidecar is gone; and
    # the next pick reads none of the JPEGs again (unpick gave their rows the new stamps).
    assert keeper(["unpick", "--run", str(out)]) == 0
    for p in jpegs:
        if p == deleted:
            continue
        if p == keeper_pick:
            assert read_embedded_xmp(str(p)) == {"Xmp.xmp.Rating": "-1"}
        else:
            assert p.read_bytes() == as_shot[p.name], p.name
    assert not list(shots.glob("*.xmp"))
    assert keeper([*argv, "--xmp", "none", "--ray-address", ray_cluster]) == 0
    after = pick.PickSummary.model_validate_json((out / "_SUMMARY.json").read_text()).embed
    assert (after["restamped"], after["changed"], after["attempted"]) == (0, 0, 0)


def test_champion_picks_match_evaluate(
    ray_cluster: str, library: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    """The registered champion ranks each burst in keeper pick exactly as keeper evaluate does."""
    root, truth = library
    out = tmp_path / "out"
    table = str(tmp_path / "table")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bursts = truth_bursts(truth)
    series = tmp_path / "bursts.csv"
    bursts[["series_id", "image_uri", "is_best"]].to_csv(series, index=False)
    # Embed through keeper pick (zero-shot), then train and register a head on that table.
    pick.run(
        pick.PickJobConfig(
            input=str(root), output=str(out), embeddings=table, zero_shot=True, xmp="none",
            ray_address=ray_cluster,
        )
    )  # fmt: skip
    # A head trained here and registered as train-head logs it: this test is about how pick
    # and evaluate rank with a registered champion, not about Ray Train (test_train_head is).
    cfg = train_head.TrainHeadConfig.model_validate(
        {"embeddings": table, "series": str(series), "head": "mlp", "epochs": 4, "patience": 4}
    )
    prepared = train_head.prepare(cfg)
    head, _ = train_head.train_single_process(prepared, cfg, "series-softmax")
    rows = join_series(table, str(series))[0]
    version = register_ranker(
        store, "pick-ranker", SeriesRanker(prepared.ranker_config, head), rows,
        tmp_path / "ranker", "pick",
    )  # fmt: skip
    client = mlflow.MlflowClient(store)
    client.set_registered_model_alias("pick-ranker", "champion", version)

    summary = pick.run(
        pick.PickJobConfig(
            input=str(root), output=str(out), embeddings=table, ranker_name="pick-ranker",
            tracking_uri=store, xmp="none", ray_address=ray_cluster,
        )
    )  # fmt: skip
    assert not summary.zero_shot
    assert summary.ranker.startswith("pick-ranker v")
    picks = read_picks(summary).assign(_k=lambda d: d["image_uri"].map(storage.same_key))
    rows = bursts.assign(_k=bursts["image_uri"].map(storage.same_key)).merge(picks, on="_k")
    # Each true burst is one group here, so the per-burst top-1 is well defined.
    assert (rows.groupby("series_id")["group"].nunique() == 1).all()
    # A shot keeper pick marked as a duplicate of another group's shot leaves the race (evaluate
    # knows nothing of duplicates): compare on the bursts pick left whole, evaluating just those.
    marked = rows.groupby("series_id")["duplicate_kind"].transform(lambda k: k.notna().any())
    whole = rows[~marked]
    assert whole["series_id"].nunique() >= 8
    hits = whole[whole["is_best"] == "1"]["decision"].eq("keep")
    same_series = tmp_path / "whole.csv"
    bursts[bursts["series_id"].isin(set(whole["series_id"]))][
        ["series_id", "image_uri", "is_best"]
    ].to_csv(same_series, index=False)

    result = evaluate.run(
        evaluate.EvaluateConfig(
            model="models:/pick-ranker@champion", embeddings=table, series=str(same_series),
            tracking_uri=store,
        )
    )  # fmt: skip
    label = next(k for k in result["metrics"] if k.startswith("pick-ranker"))
    assert result["series_scored"] == len(hits)
    assert result["metrics"][label]["top1"] == pytest.approx(hits.mean(), abs=1e-12)


def test_killed_pick_reruns_to_complete_outputs(
    ray_cluster: str, library: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, _ = library
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "keeper_train.jobs.pick", f"input={root}", f"output={out}",
        "zero_shot=true", "batch_size=4", "decode_concurrency=1", f"ray_address={ray_cluster}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "thumbs").is_dir() and any((out / "thumbs").rglob("*.jpg")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before any output was seen"
        os.kill(proc.pid, signal.SIGKILL)  # mid-embed: thumbnails written, no picks yet
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not (out / "picks.parquet").exists()

    summary = pick.run(
        pick.PickJobConfig(
            input=str(root), output=str(out), zero_shot=True, ray_address=ray_cluster
        )
    )
    c = summary.counts
    assert c["lost"] == 0
    assert c["in"] == c["picked"] + c["failed"]
    picks = read_picks(summary)
    assert picks["image_uri"].is_unique
    assert len(picks) == c["picked"]
    table = storage.read_parquet(str(out / "table" / "embeddings")).to_pandas()
    assert table["image_uri"].is_unique
    assert len(list((out / "xmp").rglob("*.xmp"))) == c["picked"]
    leftovers = [p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert leftovers == []


def test_bad_config_fails_before_any_work(tmp_path: Path) -> None:
    rc = pick.main([f"input={tmp_path}", f"output={tmp_path / 'o'}", "grouping.max_gap=3"])
    assert rc == 2
    assert not (tmp_path / "o").exists()
    rc = pick.main(
        [f"input={tmp_path}", f"output={tmp_path / 'o'}", "zero_shot=true", "model=models:/x@y"]
    )
    assert rc == 2
    # An explicit model that does not exist is an error, never a quiet switch to the rule.
    rc = pick.main(
        [
            f"input={tmp_path}",
            f"output={tmp_path / 'o'}",
            "model=models:/nothing-here@champion",
            f"tracking_uri=sqlite:///{tmp_path / 'm.db'}",
        ]
    )
    assert rc == 2
    assert not (tmp_path / "o").exists()


def test_heic_fixture_keeps_its_exif_time() -> None:
    # The HEIC fixture's EXIF survives the encoder (the grouping test above relies on it).
    data = make_heic(Image.new("RGB", (64, 48)), exif=_exif("2024:05:01 10:00:00", "1").tobytes())
    from keeper_core.capture import read_capture

    cap = read_capture(data)
    assert cap.time_source == "exif"
    assert cap.time == "2024-05-01T10:00:00.1"
