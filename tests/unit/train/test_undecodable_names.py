"""A photo whose file name is not valid UTF-8 (a Latin-1 name from an old Windows archive) is
recorded as failed (``bad_name``) and counted, and the rest of the run completes: keeper embed
and keeper pick end to end, Ray never started (the good photos are embedded in-process first,
by the stage functions, and the job runs on; a re-run embeds only what is missing).

Files are made with ``os.open`` on bytes paths, as such a library holds them on Linux.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from support import noise_jpeg, write_at_bytes_path

from keeper_core import storage
from keeper_core.errors import DataError
from keeper_train import cluster
from keeper_train.jobs import embed, pick

SPEC = "keeper-tiny:random"


@pytest.fixture
def library(tmp_path: Path) -> dict[str, str]:
    """Two photos with UTF-8 names, a Latin-1 ``caf\\xe9.jpg``, a photo in a Latin-1 folder and
    a note with a Latin-1 name (not a photo: ignored); name -> the URI listing gives it."""
    root = tmp_path / "library"
    raw = os.fsencode(root)
    write_at_bytes_path(raw + b"/a.jpg", noise_jpeg(1))
    write_at_bytes_path(raw + "/café.jpg".encode(), noise_jpeg(2))  # UTF-8: an ordinary name
    write_at_bytes_path(raw + b"/caf\xe9.jpg", noise_jpeg(3))  # Latin-1 "café.jpg"
    write_at_bytes_path(raw + b"/\xc9t\xe9/b.jpg", noise_jpeg(4))  # Latin-1 "Été/b.jpg"
    write_at_bytes_path(raw + b"/notes-\xe9.txt", b"not a photo")
    return {
        "root": str(root),
        "a": f"{root}/a.jpg",
        "cafe_utf8": f"{root}/café.jpg",
        "cafe_latin1": f"{root}/caf\\xe9.jpg",
        "ete_latin1": f"{root}/\\xc9t\\xe9/b.jpg",
    }


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError(
            "Ray was started: an input that cannot be written reached the pipeline"
        )

    monkeypatch.setattr(cluster, "init_ray", refuse)


def _embed_in_process(cfg: embed.EmbedConfig, uris: list[str]) -> None:
    """What the pipeline does for ``uris``, without Ray: read -> decode -> embed -> write a part."""
    args = embed.prepare_arguments(cfg, cfg.output, "setup")
    batch = embed.prepare_batch({"image_uri": np.array(uris, dtype=object)}, **args)
    assert list(batch["image_uri"]) == uris  # all of them decoded
    out = embed.EmbedStage(cfg.model, 8)(batch)
    embed.write_batch(
        out, spec=cfg.model, embeddings_dir=storage.join(cfg.output, embed.EMBEDDINGS)
    )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _errors(dst: str) -> pd.DataFrame:
    return storage.read_parquet(storage.join(dst, embed.ERRORS)).to_pandas()


# --------------------------------------------------------------------------------------------
# Listing


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_listing_escapes_names_that_are_not_utf8(library: dict[str, str], scheme: str) -> None:
    src = scheme + library["root"]
    uris, ignored = embed.list_inputs(src)
    assert all(_utf8(u) for u in uris), uris
    expected = [library[k] for k in ("a", "cafe_utf8", "cafe_latin1", "ete_latin1")]
    assert sorted(uris) == sorted(scheme + u for u in expected)
    assert ignored == 1  # the Latin-1 note: not a photo, whatever its name

    found = embed.find_inputs(src)
    assert found.uris == uris
    bad = {scheme + library["cafe_latin1"], scheme + library["ete_latin1"]}
    assert set(found.bad_names) == bad
    for shown, why in found.bad_names.items():
        assert shown in why
        assert "not valid UTF-8" in why
        assert "convmv" in why


def test_a_manifest_cannot_name_such_a_file_and_says_so(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_bytes(b"image_uri\ncaf\xe9.jpg\n")  # a Latin-1 CSV: not a UTF-8 manifest
    with pytest.raises(DataError, match=r"cannot read manifest.*utf-8"):
        embed.list_inputs(str(csv))
    binary = tmp_path / "m.parquet"  # bytes paths in a binary column
    pq.write_table(
        pa.table({"image_uri": pa.array([b"a.jpg", b"caf\xe9.jpg"], pa.binary())}), binary
    )
    with pytest.raises(DataError, match=r"not valid UTF-8.*convmv"):
        embed.list_inputs(str(binary))


def test_escape_name() -> None:
    assert storage.escape_name("/p/caf\udce9.jpg") == "/p/caf\\xe9.jpg"
    assert storage.escape_name("/p/café.jpg") == "/p/café.jpg"  # valid UTF-8 stays as it is
    assert storage.escape_name("x\ud800") == "x\\ud800"  # no file name decodes to this one
    assert not storage.valid_utf8("caf\udce9.jpg")
    assert storage.valid_utf8("café.jpg")


# --------------------------------------------------------------------------------------------
# keeper embed


@pytest.mark.usefixtures("no_ray")
def test_embed_records_bad_names_and_the_counts_add_up(
    library: dict[str, str], tmp_path: Path
) -> None:
    dst = str(tmp_path / "emb")
    cfg = embed.EmbedConfig(input=library["root"], output=dst, model=SPEC, max_failure_fraction=0.5)
    _embed_in_process(cfg, [library["a"], library["cafe_utf8"]])

    s = embed.run(cfg)
    c = s.counts
    assert (c.in_, c.already_embedded, c.attempted) == (4, 2, 2)
    assert (c.embedded, c.failed, c.lost) == (0, 2, 0)
    assert c.in_ == c.already_embedded + c.failed_before + c.attempted
    assert c.attempted == c.embedded + c.failed + c.lost
    assert s.errors_by_reason == {embed.BAD_NAME: 2}
    assert s.status == "ok"  # 2 of 4 failed, within this run's limit of half
    assert json.loads((tmp_path / "emb" / embed.SUMMARY).read_bytes())["counts"]["failed"] == 2

    errors = _errors(dst).sort_values("image_uri")
    assert errors["image_uri"].tolist() == sorted([library["cafe_latin1"], library["ete_latin1"]])
    assert set(errors["stage"]) == {"list"}
    assert set(errors["reason"]) == {embed.BAD_NAME}
    assert not errors["retryable"].any()
    assert errors["error"].str.contains("not valid UTF-8").all()

    # A re-run does not try them again; asked to, it records them once more, once each.
    again = embed.run(cfg)
    assert (again.counts.failed_before, again.counts.attempted) == (2, 0)
    retried = embed.run(cfg.model_copy(update={"retry_errors": True}))
    assert (retried.counts.attempted, retried.counts.failed, retried.counts.lost) == (2, 2, 0)
    assert len(_errors(dst)) == 2


def _shard(path: Path, members: dict[bytes, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for name, data in members.items():
            # The bytes of the name as written: a Latin-1 one comes back surrogate-escaped.
            info = tarfile.TarInfo(os.fsdecode(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.usefixtures("no_ray")
def test_webdataset_members_and_shards_with_such_names_fail_as_bad_name(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "00000.tar", {b"000.jpg": noise_jpeg(1), b"caf\xe9.jpg": noise_jpeg(2)})
    bad_shard = os.fsencode(shards) + b"/\xe9t\xe9.tar"
    good = tmp_path / "tmp.tar"
    _shard(good, {b"000.jpg": noise_jpeg(3)})
    write_at_bytes_path(bad_shard, good.read_bytes())
    dst = str(tmp_path / "emb")
    cfg = embed.EmbedConfig(input=str(shards), output=dst, model=SPEC)

    p = embed.plan(cfg)
    assert all(_utf8(u) for u in p.inputs), p.inputs
    assert sorted(p.bad_names) == [f"{shards}/00000.tar#caf\\xe9.jpg", f"{shards}/\\xe9t\\xe9.tar"]
    assert set(p.bad_names) <= set(p.todo)
    to_read = embed.record_planned_failures(p)
    assert to_read == [f"{shards}/00000.tar#000.jpg"]
    assert sorted(_errors(dst)["image_uri"]) == sorted(p.bad_names)


# --------------------------------------------------------------------------------------------
# keeper pick


@pytest.mark.usefixtures("no_ray")
def test_pick_records_bad_names_and_writes_every_output(
    library: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "cull"
    cfg = pick.PickJobConfig(
        input=library["root"], output=str(out), zero_shot=True, max_failure_fraction=0.5
    )
    # The good photos as keeper pick's embed step writes them: capture metadata, thumbnails.
    ecfg = embed.EmbedConfig(
        input=cfg.input, output=cfg.table, model=SPEC, capture=True, thumbnails=cfg.out
    )
    _embed_in_process(ecfg, [library["a"], library["cafe_utf8"]])

    s = pick.run(cfg)
    c = s.counts
    assert (c["in"], c["picked"], c["failed"], c["lost"]) == (4, 2, 2, 0)
    assert c["in"] == c["picked"] + c["failed"]
    assert s.status == "ok"

    picks = storage.read_parquet(s.outputs["picks_parquet"]).to_pandas()
    assert sorted(picks["image_uri"]) == sorted([library["a"], library["cafe_utf8"]])
    assert len(pd.read_csv(s.outputs["picks_csv"])) == 2
    failed = pd.read_csv(s.outputs["failed_csv"]).sort_values("image_uri")
    assert failed["image_uri"].tolist() == sorted([library["cafe_latin1"], library["ete_latin1"]])
    assert set(failed["reason"]) == {embed.BAD_NAME}
    assert failed["error"].str.contains("not valid UTF-8").all()
    index = Path(s.outputs["contact_sheet"]).read_text(encoding="utf-8")
    assert "bad_name" in index
    assert s.sidecars["written"] == 2  # the mirrored XMP of each picked photo
    assert len(list((out / "xmp").rglob("*.xmp"))) == 2
    summary: dict[str, Any] = json.loads((out / pick.SUMMARY).read_bytes())
    assert summary["counts"]["failed"] == 2


@pytest.mark.parametrize("field", ["input", "output", "copy_keepers"])
def test_a_config_path_that_is_not_utf8_is_refused_before_any_work(
    tmp_path: Path, field: str
) -> None:
    values = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}
    values[field] = os.fsdecode(os.fsencode(tmp_path) + b"/\xc9t\xe9")
    with pytest.raises(ValidationError, match=r"\\xc9t\\xe9 is not valid UTF-8.*convmv"):
        pick.PickJobConfig(**values)
    if field != "copy_keepers":
        with pytest.raises(ValidationError, match="not valid UTF-8"):
            embed.EmbedConfig(**values)
