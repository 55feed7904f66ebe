"""keeper_core.references on hand-built tables: names, percentiles, the collection layout on a
local folder and on S3 (a real moto_server), loading's refusals, and comparing against members.

Tables are written with pyarrow in keeper embed's schema (the columns a collection reads), so the
embeddings and quality features are known exactly; no model and no Ray.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import write_reference_collection

from keeper_core import storage
from keeper_core.errors import DataError, StorageError
from keeper_core.references import (
    REFERENCE_FILE,
    TOTAL,
    ReferenceMeta,
    ReferenceProfile,
    check_name,
    collection_uri,
    list_collections,
    load_collection,
    percentile_rank,
    read_meta,
    remove_collection,
    write_meta,
)
from keeper_core.scoring import AestheticConfig, PromptEmbeddings, aesthetic_scores

SPEC = "keeper-tiny:random"
D = 16


def unit_rows(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_collection(root: str, name: str, *, spec: str = SPEC, **kw: Any) -> np.ndarray:
    """A collection of random unit embeddings (support.write_reference_collection)."""
    return np.asarray(write_reference_collection(root, name, dim=D, spec=spec, **kw))


def meta(name: str, *, n: int = 12, spec: str = SPEC) -> ReferenceMeta:
    return ReferenceMeta(
        name=name,
        model_spec=spec,
        embed_dim=D,
        images=n,
        created_at="2026-01-01T00:00:00+00:00",
        updated_at="2026-01-02T00:00:00+00:00",
    )


def prompts(config: AestheticConfig) -> PromptEmbeddings:
    texts = config.all_prompts()
    return PromptEmbeddings(tuple(texts), unit_rows(len(texts), seed=99))


def brute_percentile(values: np.ndarray, v: float) -> float:
    values = values[np.isfinite(values)]
    return 100.0 * (np.sum(values < v) + 0.5 * np.sum(values == v)) / len(values)


# --------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("portfolio", True),
        ("ana-2026_v1.2", True),
        ("A", True),
        ("9lives", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("-lead", False),
        (".hidden", False),
        ("_under", False),
        ("a/b", False),
        ("..", False),
        ("has space", False),
        ("ünïcode", False),
        ("a:b", False),
        ("name\n", False),
    ],
)
def test_check_name(name: str, ok: bool) -> None:
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(DataError, match="collection name"):
            check_name(name)


def test_collection_uri_checks_the_name() -> None:
    assert collection_uri("s3://b/refs/", "p") == "s3://b/refs/p"
    with pytest.raises(DataError):
        collection_uri("/refs", "../etc")


# --------------------------------------------------------------------------------- percentiles


def test_percentile_rank_edges_and_ties() -> None:
    s = np.array([1.0, 2.0, 2.0, 2.0, 5.0])
    assert percentile_rank(np.array([]), 1.0) is None
    assert percentile_rank(s, float("nan")) is None
    assert percentile_rank(s, float("inf")) is None
    assert percentile_rank(s, 0.5) == 0.0  # below all
    assert percentile_rank(s, 9.0) == 100.0  # above all
    assert percentile_rank(s, 2.0) == pytest.approx(100 * (1 + 0.5 * 3) / 5)  # mid-rank: 50
    assert percentile_rank(s, 1.0) == pytest.approx(10.0)  # one tie at the bottom: 0.5 / 5
    assert percentile_rank(s, 3.0) == pytest.approx(80.0)  # 4 of 5 below
    assert percentile_rank(np.array([7.0, 7.0]), 7.0) == 50.0  # equal to every reference


def test_percentile_rank_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=200), 1)  # rounded: many ties
    s = np.sort(values)
    for v in [*values[:20], -9.0, 9.0, 0.05]:
        assert percentile_rank(s, float(v)) == pytest.approx(brute_percentile(values, float(v)))


# --------------------------------------------------------------------------------- layout


def test_write_read_list_remove_on_a_folder(tmp_path: Path) -> None:
    root = str(tmp_path / "refs")
    with pytest.raises(StorageError, match="no such directory"):
        list_collections(root)  # a mistyped root is not an empty one
    assert read_meta(root, "portfolio") is None
    write_collection(root, "portfolio")
    write_collection(root, "house-style", n=5)
    (tmp_path / "refs" / "unfinished" / "embeddings").mkdir(parents=True)  # no reference.json
    (tmp_path / "refs" / "bad name").mkdir()
    (tmp_path / "refs" / "bad name" / REFERENCE_FILE).write_text("{}")
    (tmp_path / "refs" / "portfolio" / "nested").mkdir()
    (tmp_path / "refs" / "portfolio" / "nested" / REFERENCE_FILE).write_text("{}")

    assert list_collections(root) == ["house-style", "portfolio"]
    got = read_meta(root, "portfolio")
    assert got == meta("portfolio")
    assert (
        json.loads((tmp_path / "refs" / "portfolio" / REFERENCE_FILE).read_text())["images"] == 12
    )

    n_files = sum(1 for p in (tmp_path / "refs" / "portfolio").rglob("*") if p.is_file())
    assert remove_collection(root, "portfolio") == n_files - 1  # reference.json, then the rest
    assert not (tmp_path / "refs" / "portfolio").exists()  # files and folders
    assert list_collections(root) == ["house-style"]
    assert remove_collection(root, "portfolio") == 0  # gone: nothing to do
    assert remove_collection(root, "unfinished") == 0  # folders only, no files
    assert not (tmp_path / "refs" / "unfinished").exists()


def test_remove_deletes_reference_json_first(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_collection(root, "p")
    order: list[str] = []
    real = storage.delete

    def spy(uri: str) -> None:
        order.append(uri)
        real(uri)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage, "delete", spy)
        remove_collection(root, "p")
    assert order[0].endswith(f"/p/{REFERENCE_FILE}")
    assert len(order) == 3  # reference.json and two parts


def test_read_meta_refuses_a_malformed_file(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / REFERENCE_FILE).write_text('{"name": "p"}')
    with pytest.raises(DataError, match=r"not a keeper reference\.json"):
        read_meta(str(tmp_path), "p")


# --------------------------------------------------------------------------------- loading


def test_load_collection_reads_every_part(tmp_path: Path) -> None:
    emb = write_collection(str(tmp_path), "p", n=9, parts=3)
    c = load_collection(str(tmp_path), "p", model_spec=SPEC)
    assert len(c) == 9
    np.testing.assert_allclose(c.embeddings, emb, atol=1e-6)
    assert c.image_uri[0] == "/photos/0.jpg"
    assert set(c.features) == {"sharpness", "brightness"}
    raw = (tmp_path / "p" / REFERENCE_FILE).read_bytes()
    assert c.version == hashlib.sha256(raw).hexdigest()


def test_load_collection_refusals(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_collection(root, "p")
    with pytest.raises(DataError, match=r"embedded with keeper-tiny:random.*ViT-B-32"):
        load_collection(root, "p", model_spec="ViT-B-32:random")
    with pytest.raises(DataError, match="no reference collection 'missing'"):
        load_collection(root, "missing")
    write_meta(root, meta("p").model_copy(update={"name": "other"}))  # written under p/
    (tmp_path / "p" / REFERENCE_FILE).write_text((tmp_path / "other" / REFERENCE_FILE).read_text())
    with pytest.raises(DataError, match="names 'other', its folder 'p'"):
        load_collection(root, "p")
    write_collection(root, "mixed", row_spec="ViT-B-32:random")
    with pytest.raises(DataError, match="its rows hold"):
        load_collection(root, "mixed")


def test_nearest_refuses_another_dimension(tmp_path: Path) -> None:
    write_collection(str(tmp_path), "p")
    c = load_collection(str(tmp_path), "p")
    with pytest.raises(DataError, match="dimension 8"):
        c.nearest(np.ones(8, np.float32), 3)


# --------------------------------------------------------------------------------- comparing


def test_compare_a_member_and_percentiles_by_brute_force(tmp_path: Path) -> None:
    n = 40
    feats = {
        "sharpness": np.random.default_rng(5).uniform(0, 8, n),
        "noise": np.where(np.arange(n) % 7 == 0, np.nan, np.linspace(0, 1, n)),
    }
    emb = write_collection(str(tmp_path), "p", n=n, features=feats)
    config = AestheticConfig.default()
    pe = prompts(config)
    c = load_collection(str(tmp_path), "p", model_spec=SPEC)
    profile = ReferenceProfile.build(c, pe, config)

    # A member compared with its own embedding is its own nearest neighbour.
    cmp = profile.compare(emb[17], None, k=5)
    assert cmp.nearest[0].image_id == "id17"
    assert cmp.nearest[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(cmp.nearest) == 5
    assert [x.score for x in cmp.nearest] == sorted((x.score for x in cmp.nearest), reverse=True)
    assert cmp.quality == {}  # no features given: no quality standings
    assert len(profile.compare(emb[0], None, k=100).nearest) == n  # k above N: every member

    # Percentiles of a non-member equal a brute-force count over the members' own scores.
    query = unit_rows(1, seed=123)[0]
    given = {"sharpness": 4.0, "noise": 0.5, "brightness": 0.3, "not_a_feature": 1.0}
    cmp = profile.compare(query, given, k=3)
    members = aesthetic_scores(emb, pe, config)
    q = aesthetic_scores(query[None, :], pe, config)
    assert set(cmp.aesthetic) == {TOTAL, *members.dimensions}
    for d, standing in cmp.aesthetic.items():
        values = members.total if d == TOTAL else members.dimensions[d]
        value = float(q.total[0] if d == TOTAL else q.dimensions[d][0])
        assert standing.value == pytest.approx(value)
        assert standing.percentile == pytest.approx(brute_percentile(values, standing.value))
    # Quality: only the features given that the collection has (brightness is not in it).
    assert set(cmp.quality) == {"sharpness", "noise"}
    assert cmp.quality["sharpness"].percentile == pytest.approx(
        brute_percentile(feats["sharpness"], 4.0)
    )
    assert cmp.quality["noise"].percentile == pytest.approx(brute_percentile(feats["noise"], 0.5))
    nan = profile.compare(query, {"sharpness": float("nan")}, k=1).quality["sharpness"]
    assert nan.percentile is None


def test_compare_refuses_another_dimension(tmp_path: Path) -> None:
    write_collection(str(tmp_path), "p")
    config = AestheticConfig.default()
    profile = ReferenceProfile.build(load_collection(str(tmp_path), "p"), prompts(config), config)
    with pytest.raises(DataError, match="dimension"):
        profile.compare(np.ones(D + 1, np.float32) / np.sqrt(D + 1), None, k=1)


# --------------------------------------------------------------------------------- S3


def test_list_load_remove_on_s3(s3_bucket: str) -> None:
    root = f"s3://{s3_bucket}/refs"
    assert list_collections(root) == []
    emb = write_collection(root, "portfolio", n=6)
    write_collection(root, "second", n=3)
    storage.write_bytes(f"{root}/unfinished/embeddings/part-0.parquet", b"x")  # no reference.json
    assert list_collections(root) == ["portfolio", "second"]
    assert list_collections(f"{root}/") == ["portfolio", "second"]
    c = load_collection(root, "portfolio", model_spec=SPEC)
    np.testing.assert_allclose(c.embeddings, emb, atol=1e-6)
    assert read_meta(root, "portfolio") == meta("portfolio", n=6)

    assert remove_collection(root, "portfolio") == 2  # two parts after reference.json
    assert storage.list_files(f"{root}/portfolio") == []
    assert list_collections(root) == ["second"]
    with pytest.raises(DataError, match="no reference collection 'portfolio'"):
        load_collection(root, "portfolio")
    assert remove_collection(root, "portfolio") == 0
