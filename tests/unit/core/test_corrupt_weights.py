"""A corrupt saved ranker is a ``DataError`` naming the file, never a bare library error.

safetensors raises ``SafetensorError`` (a plain ``Exception``) on a corrupt file and
``json.loads`` a ``RecursionError`` on JSON nested too deep: both used to escape keeper's error
types (a Serve replica then failed to start, the CLIs printed a traceback instead of exit 2).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from keeper_core.errors import DataError, KeeperError
from keeper_core.finetune import ADAPTER_FILE, BLOCKS_FILE, TunedRanker
from keeper_core.heads import HeadConfig
from keeper_core.ranker import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    RankerConfig,
    SeriesRanker,
    load_ranker,
)
from keeper_core.tower import TowerConfig

TINY = "keeper-tiny:random"  # a 2-block ViT, embed_dim 64 (model_configs/keeper-tiny.json)
CORRUPT = b"\xff" * 8  # a header length of 2**64 - 1: "header too large"


def series_ranker(dim: int = 8) -> SeriesRanker:
    torch.manual_seed(0)
    return SeriesRanker(
        RankerConfig(
            head=HeadConfig(kind="mlp", in_dim=dim, hidden=16, layers=1),
            features="embedding",
            embedding_spec=TINY,
            embed_dim=dim,
        )
    )


@pytest.fixture(scope="module")
def head_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved SeriesRanker (read-only: copy it)."""
    return series_ranker().save(tmp_path_factory.mktemp("head"))


@pytest.fixture(scope="module")
def tuned_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved LoRA TunedRanker over keeper-tiny:random (read-only: copy it)."""
    config = RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=64, hidden=16, layers=1, dropout=0.0),
        features="embedding",
        embedding_spec=TINY,
        embed_dim=64,
        tower=TowerConfig(base_spec=TINY, method="lora"),
    )
    return TunedRanker.build(config, device="cpu").save(tmp_path_factory.mktemp("tuned"))


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "ranker"))


def test_the_saved_rankers_load(head_folder: Path, tuned_folder: Path) -> None:
    assert isinstance(load_ranker(head_folder), SeriesRanker)
    assert isinstance(load_ranker(tuned_folder, device="cpu"), TunedRanker)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(CORRUPT, id="ff-bytes"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", id="bad-header"),
    ],
)
def test_corrupt_head_weights_are_a_data_error(
    head_folder: Path, tmp_path: Path, data: bytes
) -> None:
    d = copy(head_folder, tmp_path)
    (d / WEIGHTS_FILE).write_bytes(data)
    for load in (load_ranker, SeriesRanker.load):
        with pytest.raises(DataError) as e:
            load(d)
        assert e.value.source == str(d / WEIGHTS_FILE), load
        assert WEIGHTS_FILE in str(e.value)


def test_head_weights_that_do_not_fit_are_still_a_data_error(
    head_folder: Path, tmp_path: Path
) -> None:
    d = copy(head_folder, tmp_path)
    tensors = load_file(str(d / WEIGHTS_FILE))
    key = sorted(tensors)[0]
    save_file({**tensors, key: torch.zeros(3, 3)}, str(d / WEIGHTS_FILE))
    with pytest.raises(DataError, match="size mismatch"):
        load_ranker(d)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, ADAPTER_FILE, BLOCKS_FILE])
def test_corrupt_tuned_tensors_are_a_data_error(
    tuned_folder: Path, tmp_path: Path, name: str
) -> None:
    d = copy(tuned_folder, tmp_path)
    (d / name).write_bytes(CORRUPT)
    with pytest.raises(DataError) as e:
        load_ranker(d, device="cpu")
    assert e.value.source == str(d / name)
    with pytest.raises(DataError):
        TunedRanker.load(d, device="cpu")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"\xff\xfe not utf-8", id="not-utf8"),
        pytest.param(b"[" * 100_000, id="nested-too-deep"),  # json.loads: RecursionError
        pytest.param(b"{}", id="not-a-config"),
    ],
)
@pytest.mark.parametrize("kind", ["head", "tuned"])
def test_corrupt_ranker_json_is_a_data_error(
    head_folder: Path, tuned_folder: Path, tmp_path: Path, text: bytes, kind: str
) -> None:
    d = copy(head_folder if kind == "head" else tuned_folder, tmp_path)
    (d / CONFIG_FILE).write_bytes(text)
    loaders = [load_ranker, SeriesRanker.load if kind == "head" else TunedRanker.load]
    for load in loaders:
        with pytest.raises(DataError) as e:
            load(d)
        assert e.value.source == str(d), load


def test_a_corrupt_ranker_never_escapes_keeper_errors(head_folder: Path, tmp_path: Path) -> None:
    """Random bytes in place of the weights, many times: always a KeeperError."""
    rng = np.random.default_rng(0)
    d = copy(head_folder, tmp_path)
    good = (d / WEIGHTS_FILE).read_bytes()
    for _ in range(50):
        data = bytearray(good)
        for i in rng.integers(0, len(data), 4):
            data[i] = int(rng.integers(0, 256))
        (d / WEIGHTS_FILE).write_bytes(bytes(data[: int(rng.integers(0, len(data) + 1))]))
        with contextlib.suppress(KeeperError):
            load_ranker(d)
