"""Config mistakes fail before any work: a ConfigError naming the key, before Ray, embedding or
reading the data where the mistake is visible without it (pick, dedup, index, train-head,
feedback-export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from keeper_core import storage
from keeper_core.errors import ConfigError
from keeper_train.config import load_config
from keeper_train.jobs import dedup, embed, feedback_export, finetune, index, pick, train_head


def _refuse(*_: object, **__: object) -> None:
    raise AssertionError("the job did work before refusing its config")


# --------------------------------------------------------------------------------------------
# pick: sidecar and keeper-export settings the write step cannot honour


@pytest.fixture
def no_pick_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if pick gets as far as the ranker, the embed step or Ray."""
    monkeypatch.setattr(pick, "resolve_ranker", _refuse)
    monkeypatch.setattr(embed, "run", _refuse)
    monkeypatch.setattr(pick, "load_library", _refuse)


def _manifest(tmp_path: Path, uris: list[str]) -> str:
    path = tmp_path / "photos.csv"
    path.write_text("image_uri\n" + "".join(f"{u}\n" for u in uris))
    return str(path)


def _pick(tmp_path: Path, uris: list[str], *overrides: str) -> pick.PickJobConfig:
    src = _manifest(tmp_path, uris)
    return load_config(
        pick.PickJobConfig,
        None,
        [f"input={src}", f"output={tmp_path / 'out'}", "zero_shot=true", *overrides],
    )


TWO_BUCKETS = ["s3://bucket-a/trip/IMG_1.JPG", "s3://bucket-b/trip/IMG_2.JPG"]


@pytest.mark.usefixtures("no_pick_work")
def test_pick_mirror_of_a_manifest_across_buckets_fails_before_embedding(tmp_path: Path) -> None:
    cfg = _pick(tmp_path, TWO_BUCKETS)  # xmp=mirror, the default
    with pytest.raises(ConfigError, match=r"span 2 buckets \(bucket-a, bucket-b\).*xmp=mirror"):
        pick.run(cfg)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.usefixtures("no_pick_work")
def test_pick_copy_keepers_of_a_mixed_manifest_fails_before_embedding(tmp_path: Path) -> None:
    uris = ["s3://bucket-a/trip/IMG_1.JPG", str(tmp_path / "IMG_2.JPG")]
    cfg = _pick(tmp_path, uris, "xmp=none", f"copy_keepers={tmp_path / 'keepers'}")
    with pytest.raises(ConfigError, match=r"mixes s3:// and local images.*copy_keepers"):
        pick.run(cfg)


@pytest.mark.usefixtures("no_pick_work")
def test_pick_beside_with_s3_images_in_a_manifest_fails_before_embedding(tmp_path: Path) -> None:
    cfg = _pick(tmp_path, ["s3://bucket-a/trip/IMG_1.JPG"], "xmp=beside")
    with pytest.raises(ConfigError, match=r"xmp=beside.*s3://bucket-a/trip/IMG_1\.JPG is on S3"):
        pick.run(cfg)


@pytest.mark.usefixtures("no_pick_work")
def test_pick_links_with_s3_fail_before_embedding(tmp_path: Path) -> None:
    local = [str(tmp_path / "lib" / "IMG_1.JPG")]
    cfg = _pick(tmp_path, local, "link_keepers=s3://bucket-a/keepers/")
    with pytest.raises(ConfigError, match=r"link_keepers='s3://bucket-a/keepers/'.*copy only"):
        pick.run(cfg)
    cfg = _pick(tmp_path, ["s3://bucket-a/trip/IMG_1.JPG"], f"link_keepers={tmp_path / 'k'}")
    with pytest.raises(ConfigError, match=r"link_keepers.*images are on S3.*copy_keepers"):
        pick.run(cfg)


def test_pick_limit_applies_as_in_the_later_steps(tmp_path: Path) -> None:
    # Only the first `limit` images are embedded and written: only they need one root.
    pick.check_handback(_pick(tmp_path, TWO_BUCKETS, "limit=1"))
    with pytest.raises(ConfigError, match="buckets"):
        pick.check_handback(_pick(tmp_path, TWO_BUCKETS, "limit=2"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["xmp=none"],  # nothing mirrored: any manifest
        ["xmp=none", "copy_keepers=s3://bucket-c/keepers/"],
    ],
)
def test_pick_settings_the_write_step_can_honour_pass(tmp_path: Path, overrides: list[str]) -> None:
    one_bucket = ["s3://bucket-a/trip/day1/IMG_1.JPG", "s3://bucket-a/trip/day2/IMG_2.JPG"]
    pick.check_handback(_pick(tmp_path, one_bucket, *overrides))
    pick.check_handback(_pick(tmp_path, one_bucket))  # mirror: one bucket has a root
    assert _pick(tmp_path, one_bucket).input_root(one_bucket) == "s3://bucket-a/trip"
    if overrides == ["xmp=none"]:
        pick.check_handback(_pick(tmp_path, TWO_BUCKETS, *overrides))
        # ... and the write step then asks for no root either (it used to, and refused).
        assert not _pick(tmp_path, TWO_BUCKETS, *overrides).mirrors_paths
    local = [str(tmp_path / "a" / "IMG_1.JPG"), str(tmp_path / "b" / "IMG_2.JPG")]
    pick.check_handback(_pick(tmp_path, local, "xmp=beside", f"link_keepers={tmp_path / 'k'}"))


def test_pick_folder_input_is_not_listed_for_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A folder's or prefix's root is the input itself: no listing before embed lists it.
    monkeypatch.setattr(storage, "list_files", _refuse)
    monkeypatch.setattr(embed, "list_inputs", _refuse)
    for xmp in ("mirror", "beside"):
        pick.check_handback(
            pick.PickJobConfig(
                input=str(tmp_path / "photos"),
                output=str(tmp_path / "out"),
                xmp=xmp,
                copy_keepers=str(tmp_path / "keepers"),
            )
        )


# --------------------------------------------------------------------------------------------
# dedup: keep_by must be a numeric column


def _table(tmp_path: Path) -> str:
    root = tmp_path / "table"
    n = 3
    emb = np.eye(n, 4, dtype=np.float32)
    t = pa.table(
        {
            "image_uri": [f"/photos/IMG_{i}.JPG" for i in range(n)],
            "image_id": [f"id{i}" for i in range(n)],
            "model_spec": ["keeper-tiny:random"] * n,
            "embedding": pa.array(emb.tolist(), pa.list_(pa.float32())),
            "sharpness": pa.array([1.0, 2.0, 3.0], pa.float32()),
            "width": pa.array([640] * n, pa.int32()),
            "height": pa.array([480] * n, pa.int32()),
        }
    )
    storage.write_parquet(t, str(root / "embeddings" / "part-00000.parquet"))
    return str(root)


@pytest.mark.parametrize(
    ("keep_by", "why"),
    [
        ("image_uri", r"keep_by 'image_uri' is a column of type string, not a number"),
        ("model_spec", r"keep_by 'model_spec' is a column of type string"),
        ("nope", r"keep_by 'nope' is not a column of the table"),
    ],
)
def test_dedup_keep_by_a_non_numeric_column_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_by: str, why: str
) -> None:
    monkeypatch.setattr(dedup, "embedding_matrix", _refuse)
    monkeypatch.setattr(dedup, "build", _refuse)
    monkeypatch.setattr(dedup.VectorIndex, "load", _refuse)
    cfg = dedup.DedupConfig(table=_table(tmp_path), output=str(tmp_path / "out"), keep_by=keep_by)
    with pytest.raises(ConfigError, match=why) as e:
        dedup.run(cfg)
    assert "['sharpness', 'width', 'height']" in str(e.value)  # the choices, named
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep_by", ["sharpness", "width", "pixels"])
def test_dedup_numeric_keep_by_passes(tmp_path: Path, keep_by: str) -> None:
    schema = storage.read_parquet(str(Path(_table(tmp_path)) / "embeddings")).schema
    dedup.check_keep_by(schema, keep_by)


# --------------------------------------------------------------------------------------------
# index: backend and dtype, in the config


@pytest.mark.parametrize(
    ("backend", "match"),
    [
        ("exact", r"backend=exact dtype=i8: dtype 'i8' is not one exact stores"),
        ("faiss", r"backend=faiss dtype=i8: dtype 'i8' is not one faiss stores"),
        ("auto", r"backend=auto dtype=i8: .*backend=auto takes exact below 300000"),
    ],
)
def test_index_backend_dtype_mismatch_is_a_config_error(backend: str, match: str) -> None:
    with pytest.raises(ConfigError, match=rf"invalid IndexConfig: .*{match}"):
        load_config(index.IndexConfig, None, ["table=emb/", f"backend={backend}", "dtype=i8"])


def test_index_valid_combinations_build() -> None:
    cfg = load_config(index.IndexConfig, None, ["table=emb/", "backend=usearch", "dtype=i8"])
    assert (cfg.params(10).backend, cfg.params(10).dtype) == ("usearch", "i8")
    for backend in ("auto", "exact", "faiss"):
        for dtype in ("f32", "f16"):
            load_config(
                index.IndexConfig, None, ["table=emb/", f"backend={backend}", f"dtype={dtype}"]
            )


def test_index_exits_2_before_listing_the_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(index, "list_parts", _refuse)
    monkeypatch.setattr(storage, "read_parquet", _refuse)
    assert index.main(["table=emb/", "backend=exact", "dtype=i8"]) == 2
    assert "dtype 'i8' is not one exact stores" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# train-head: split_fractions (and the named groups that replace them)

HEAD = ["embeddings=emb/", "series=series.csv"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["split_fractions=[0.9, 0.9, -0.8]"], r"split_fractions: .*three numbers >= 0"),
        (["split_fractions=[0.5, 0.3, 0.1]"], r"split_fractions: .*sum to 1"),
        (["split_fractions=[.nan, 0.5, 0.5]"], r"split_fractions: .*three numbers >= 0"),
        (["split_fractions=[0.5, 0.5, 0]"], r"split_fractions \(0.5, 0.5, 0.0\).*> 0"),
        (["split_fractions=[0, 0.5, 0.5]"], r"split_fractions .*> 0"),
        (["split_by=base_photo", "val_groups=[a]"], r"val_groups without test_groups"),
        (["split_by=base_photo", "test_groups=[a]"], r"test_groups without val_groups"),
    ],
)
def test_train_head_bad_split_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, overrides: list[str], match: str
) -> None:
    monkeypatch.setattr(train_head, "join_series", _refuse)
    with pytest.raises(ConfigError, match=rf"invalid TrainHeadConfig: .*{match}"):
        load_config(train_head.TrainHeadConfig, None, [*HEAD, *overrides])
    assert train_head.main([*HEAD, *overrides]) == 2  # before the data is read


@pytest.mark.parametrize(
    "overrides",
    [
        ["split_fractions=[0.9, 0.9, -0.8]"],
        ["split_fractions=[0.5, 0.5, 0]"],
        ["split_by=base_photo", "val_groups=[a]"],
    ],
)
def test_finetune_checks_its_split_as_train_head_does(overrides: list[str]) -> None:
    # The same SplitSettings: refused when the config is built, before the manifest is read.
    with pytest.raises(ConfigError, match=r"invalid FinetuneConfig: .*(split_fractions|groups)"):
        load_config(finetune.FinetuneConfig, None, ["series=series.csv", *overrides])


def test_train_head_good_splits_build() -> None:
    for overrides in (
        [],
        ["split_fractions=[0.8, 0.1, 0.1]"],
        ["split_fractions=[0.6, 0.2, 0.2]"],
        # Named groups replace the fractions: theirs are not used, only checked as numbers.
        ["split_by=base_photo", "val_groups=[a]", "test_groups=[b]", "split_fractions=[1,0,0]"],
    ):
        load_config(train_head.TrainHeadConfig, None, [*HEAD, *overrides])


# --------------------------------------------------------------------------------------------
# feedback-export: model_spec, parsed as embed parses model

FB = ["feedback=fb/", "output=out/"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("NoSuchNet:random", r"unknown architecture 'NoSuchNet'"),
        ("ViT-B-32:nosuchtag", r"'nosuchtag' is neither a checkpoint path nor a pretrained tag"),
        ("' '", r"a model spec is a non-empty string"),
    ],
)
def test_feedback_export_bad_model_spec_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, spec: str, match: str
) -> None:
    monkeypatch.setattr(feedback_export, "read_feedback", _refuse)
    monkeypatch.setattr(feedback_export, "read_offers", _refuse)
    with pytest.raises(ConfigError, match=rf"invalid FeedbackExportConfig: model_spec: .*{match}"):
        load_config(feedback_export.FeedbackExportConfig, None, [*FB, f"model_spec={spec}"])


def test_feedback_export_model_spec_is_canonical() -> None:
    cfg = load_config(feedback_export.FeedbackExportConfig, None, [*FB, "model_spec=keeper-tiny"])
    assert cfg.model_spec == "keeper-tiny:random"
    cfg = load_config(feedback_export.FeedbackExportConfig, None, FB)
    assert cfg.model_spec is None
