"""ModelSpec parsing and load_clip: every weights kind, and every way a spec fails to load."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import ModelLoadError
from keeper_core.models import (
    ModelSpec,
    load_clip,
    parameter_count,
    preprocess_config,
    save_checkpoint,
    weights_version,
)

TINY = "keeper-tiny:random"


@pytest.mark.parametrize(
    ("text", "arch", "weights", "kind"),
    [
        ("keeper-tiny", "keeper-tiny", "random", "random"),
        ("keeper-tiny:random", "keeper-tiny", "random", "random"),
        ("ViT-B-32:laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k", "tag"),
        ("ViT-B-32:/models/w.safetensors", "ViT-B-32", "/models/w.safetensors", "file"),
        ("ViT-B-32:w.pt", "ViT-B-32", "w.pt", "file"),
        ("ViT-B-32:s3://bucket/k/w.safetensors", "ViT-B-32", "s3://bucket/k/w.safetensors", "s3"),
    ],
)
def test_parse_spec(text: str, arch: str, weights: str, kind: str) -> None:
    spec = ModelSpec.parse(text)
    assert (spec.arch, spec.weights, spec.weights_kind) == (arch, weights, kind)
    assert ModelSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("bad", ["", "  ", ":random", "ViT-B-32:"])
def test_parse_spec_rejects(bad: str) -> None:
    with pytest.raises(ModelLoadError):
        ModelSpec.parse(bad)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """keeper-tiny with weights that differ from the seeded random init, saved both ways."""
    clip = load_clip(TINY, "cpu")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(123)
        for p in clip.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    d = tmp_path_factory.mktemp("ckpt")
    return save_checkpoint(clip.model, d / "tiny.safetensors"), save_checkpoint(
        clip.model, d / "tiny.pt"
    )


def test_random_is_deterministic_across_loads(images: list[Image.Image]) -> None:
    a = ClipEmbedder(TINY).embed_images(images)
    b = ClipEmbedder(TINY).embed_images(images)
    np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip_file_and_s3(
    trained_checkpoint: tuple[Path, Path],
    images: list[Image.Image],
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    st_path, pt_path = trained_checkpoint
    from_st = ClipEmbedder(f"keeper-tiny:{st_path}").embed_images(images)
    from_pt = ClipEmbedder(f"keeper-tiny:{pt_path}").embed_images(images)
    random = ClipEmbedder(TINY).embed_images(images)
    np.testing.assert_allclose(from_st, from_pt, atol=1e-6)
    assert not np.allclose(from_st, random, atol=1e-3), "checkpoint weights were not applied"

    boto3.client("s3").upload_file(str(st_path), s3_bucket, "models/tiny.safetensors")
    uri = f"s3://{s3_bucket}/models/tiny.safetensors"
    cache = tmp_path / "cache"
    from_s3 = ClipEmbedder(f"keeper-tiny:{uri}", cache_dir=cache).embed_images(images)
    np.testing.assert_allclose(from_s3, from_st, atol=1e-6)
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    ClipEmbedder(f"keeper-tiny:{uri}", cache_dir=cache)  # second load: from the cache
    assert [p for p in cache.rglob("*") if p.is_file()] == cached
    assert cached[0].stat().st_mtime_ns == mtime


def test_weights_version_tells_a_replaced_checkpoint_apart(
    trained_checkpoint: tuple[Path, Path], s3_bucket: str, tmp_path: Path
) -> None:
    st_path, _ = trained_checkpoint
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(st_path.read_bytes())
    first = weights_version(f"keeper-tiny:{path}")
    assert first is not None
    assert first.startswith("sha256:")
    assert weights_version(f"keeper-tiny:{path}") == first  # same bytes, same version
    save_checkpoint(load_clip(TINY, "cpu").model, path)  # other weights at the same path
    assert weights_version(f"keeper-tiny:{path}") not in (None, first)
    # S3: the object's ETag, which a new upload changes.
    s3 = boto3.client("s3")
    s3.upload_file(str(st_path), s3_bucket, "models/v.safetensors")
    uri = f"s3://{s3_bucket}/models/v.safetensors"
    before = weights_version(f"keeper-tiny:{uri}")
    assert before is not None
    assert before.startswith("etag:")
    s3.upload_file(str(path), s3_bucket, "models/v.safetensors")
    assert weights_version(f"keeper-tiny:{uri}") != before
    # Random init and open_clip's named tags are versions by their names.
    assert weights_version(TINY) is None
    assert weights_version("ViT-B-32:openai") is None


def test_unknown_arch() -> None:
    with pytest.raises(ModelLoadError, match="unknown architecture 'NoSuchNet'"):
        load_clip("NoSuchNet:random")


def test_parameter_count_equals_the_built_model_without_building_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From the config on torch's meta device: the same count as the loaded model, quietly (no
    "initialized randomly" warning for weights nobody meant to load)."""
    model = load_clip(TINY, "cpu").model
    want = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    caplog.clear()
    assert parameter_count(TINY) == want
    assert parameter_count("ViT-B-32:laion2b_s34b_b79k") == 151_283_242  # no download: a config
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with pytest.raises(ModelLoadError, match="unknown architecture 'NoSuchNet'"):
        parameter_count("NoSuchNet:random")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="checkpoint file not found") as info:
        load_clip(f"keeper-tiny:{tmp_path}/nope.safetensors")
    assert info.value.spec.endswith("nope.safetensors")


def test_shape_mismatch(tmp_path: Path) -> None:
    clip = load_clip(TINY, "cpu")
    state = {k: v.clone() for k, v in clip.model.state_dict().items()}
    state["visual.conv1.weight"] = torch.zeros(7, 3, 8, 8)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match=r"size mismatch|shape"):
        load_clip(f"keeper-tiny:{tmp_path}/bad.pt")


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickle code ran",))


def test_pickle_payload_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ModelLoadError, match=r"evil\.pt"):
        load_clip(f"keeper-tiny:{path}")


def test_unreachable_s3_object(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot fetch checkpoint"):
        load_clip(f"keeper-tiny:s3://{s3_bucket}/missing.safetensors", cache_dir=tmp_path)


def test_unknown_tag_names_known_tags() -> None:
    with pytest.raises(ModelLoadError, match="laion2b_s34b_b79k"):
        load_clip("ViT-B-32:no_such_tag")


def test_hub_tag_offline_is_an_error(tmp_path: Path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so the check runs in a fresh process.
    code = (
        "from keeper_core.models import load_clip\n"
        "from keeper_core.errors import ModelLoadError\n"
        "try:\n"
        f"    load_clip('ViT-B-32:laion2b_s34b_b79k', 'cpu', cache_dir={str(tmp_path)!r})\n"
        "except ModelLoadError as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "REFUSED cannot load model 'ViT-B-32:laion2b_s34b_b79k'" in proc.stdout, proc.stderr


def test_preprocess_config_without_weights() -> None:
    assert preprocess_config(TINY).image_size == 64
    cfg = preprocess_config("ViT-B-32:laion2b_s34b_b79k")
    assert cfg.image_size == 224
    assert len(cfg.mean) == 3


@pytest.mark.parametrize(
    ("arch", "tag"),
    [
        ("ViT-B-16-SigLIP", "webli"),  # mean and std 0.5, squash: open_clip keeps it with the tag
        ("ViT-SO400M-14-SigLIP2", "webli"),
        ("MobileCLIP-S2", "datacompdr"),
        ("ViT-H-14-378-quickgelu", "dfn5b"),  # CLIP's mean, squash resize
        ("ViT-B-32", "laion2b_s34b_b79k"),  # the config's default, as every tag of it
    ],
)
def test_a_checkpoint_file_is_prepared_as_the_architectures_pretrained_weights(
    arch: str, tag: str
) -> None:
    """Where every pretrained tag of an architecture prepares images one way, a checkpoint
    file, an S3 object and random init of it are prepared that way too."""
    want = preprocess_config(f"{arch}:{tag}")
    for weights in ("/models/w.safetensors", "s3://bucket/w.safetensors", "random"):
        assert preprocess_config(f"{arch}:{weights}") == want


def test_where_the_tags_differ_a_file_takes_the_config_and_loading_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from keeper_core import models

    file = preprocess_config("ViT-L-14:/models/w.safetensors")
    assert file == preprocess_config("ViT-L-14:openai")
    assert file != preprocess_config("ViT-L-14:laion2b_s32b_b82k")  # mean and std 0.5
    spec = models.ModelSpec.parse("ViT-L-14:/models/w.safetensors")
    with caplog.at_level("WARNING", logger="keeper_core.models"):
        models._warn_if_tags_differ(spec, models._model_config(spec))
        models._warn_if_tags_differ(spec, models._model_config(spec))  # once per spec
    assert caplog.text.count("laion2b_s32b_b82k") == 1
    assert "load that tag instead" in caplog.text
    caplog.clear()
    siglip = models.ModelSpec.parse("ViT-B-16-SigLIP:/models/w.safetensors")
    with caplog.at_level("WARNING", logger="keeper_core.models"):
        models._warn_if_tags_differ(siglip, models._model_config(siglip))
    assert caplog.text == ""  # its tags agree


@pytest.mark.parametrize(
    ("arch", "tag"),
    [
        ("ViT-B-16-SigLIP", "webli"),
        ("ViT-B-32", "laion2b_s34b_b79k"),
        ("MobileCLIP-S2", "datacompdr"),
        ("ViT-H-14-378-quickgelu", "dfn5b"),
    ],
)
def test_the_transform_is_open_clips_own_for_the_tag_and_for_a_file_of_it(
    arch: str, tag: str
) -> None:
    """keeper's image transform (what its CPU and GPU preparation follow) gives open_clip's
    pixels for a pretrained tag, and the same for a checkpoint file of that architecture."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    from keeper_core.models import image_transform

    cfg = open_clip.get_model_config(arch)
    pre = merge_preprocess_dict(
        PreprocessCfg(size=cfg["vision_cfg"]["image_size"]), cfg.get("preprocess_cfg", {})
    )
    tagged = open_clip.get_pretrained_cfg(arch, tag)
    keys = ("mean", "std", "interpolation", "resize_mode", "fill_color")
    pre = merge_preprocess_dict(PreprocessCfg(**pre), {k: tagged[k] for k in keys if k in tagged})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), np.uint8))
    theirs = image_transform_v2(PreprocessCfg(**pre), is_train=False)(image)
    for weights in (tag, "/models/w.safetensors"):
        assert torch.equal(image_transform(f"{arch}:{weights}")(image), theirs), weights
