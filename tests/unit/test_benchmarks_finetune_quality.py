"""benchmarks/finetune_quality.py: the --aux-quality probe reads the ranker's own embedding and
its loss is what it says; a row trains with and without it (the 4-fold table itself is the
documented command: an hour on 2 cores)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from support import import_benchmark

from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig
from keeper_core.ranker import QUALITY_INPUTS, RankerConfig
from keeper_core.tower import TowerConfig

SPEC = "keeper-tiny:random"


def _config() -> RankerConfig:
    """A last-blocks+lora ranker of keeper-tiny reading the embedding alone."""
    return RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=64, hidden=16, layers=1, dropout=0.0),
        features="embedding",
        embedding_spec=SPEC,
        embed_dim=64,
        tower=TowerConfig(base_spec=SPEC, method="last-blocks+lora"),
    )


@pytest.fixture(scope="module")
def fq() -> ModuleType:
    return import_benchmark("finetune_quality")


def test_probe_scores_as_the_ranker_and_its_loss_is_the_mse(fq: ModuleType) -> None:
    rc = _config()
    model = TunedRanker.build(rc, device="cpu").model
    mean, std = [4.0, 0.5], [2.0, 0.25]
    probe = fq.QualityProbe(model, 64, mean, std).eval()
    rng = np.random.default_rng(0)
    pixels = torch.as_tensor(rng.integers(0, 256, (5, 3, 64, 64), dtype=np.uint8))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    quality = torch.as_tensor(rng.normal(mean, std, (5, 2)).astype(np.float32))
    with torch.no_grad():
        scores, loss = probe(pixels, mask, quality)
        torch.testing.assert_close(scores, model(pixels, mask), rtol=0, atol=0)
        target = (quality - torch.tensor(mean)) / torch.tensor(std)
        want = ((probe.probe(model.tower(pixels)) - target) ** 2).mean()
    torch.testing.assert_close(loss, want)


def _rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    q = len(QUALITY_INPUTS)
    return [
        {
            "pixels": rng.integers(0, 256, 3 * 3 * 64 * 64, dtype=np.uint8),
            "quality": rng.normal(size=3 * q).astype(np.float32),
            "length": 3,
            "best": int(rng.integers(3)),
        }
        for _ in range(n)
    ]


def test_a_row_trains_with_and_without_the_probe(
    fq: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fq.SETTINGS, "epochs", 1)
    data = {"train": _rows(8, 0), "val": _rows(4, 1), "test": _rows(4, 2)}
    train_q = np.concatenate([r["quality"].reshape(3, -1) for r in data["train"]])
    for aux in (0.0, 1.0):
        monkeypatch.setitem(fq.SETTINGS, "aux_quality", aux)
        val, test, _, _, history = fq.train_one(
            "last-blocks+lora", "embedding", data, train_q, seed=0
        )
        assert val.n_series == 4
        assert test.n_series == 4
        # one entry per epoch; the test figure at the best val epoch is the one returned
        assert [h["epoch"] for h in history] == [0]
        assert history[0]["test_top1"] == test.top1
        assert history[0]["val_top1"] == val.top1
        assert history[0]["val_nll"] > 0


def test_extra_series_are_rows_of_the_training_photos(fq: ModuleType) -> None:
    """benchmarks/finetune_extra_series.py: series rendered from the given photos only, as
    ``series_rows`` makes them (pixels and quality per shot, the clean shot as best)."""
    fx = import_benchmark("finetune_extra_series")
    rows = fx.extra_series(["coffee", "coins"], 4, (0.02, 0.5), fold=0)
    assert len(rows) == 4
    side = 64 * 64 * 3  # keeper-tiny's input, uint8
    for r in rows:
        n = r["length"]
        assert 2 <= n <= 5
        assert 0 <= r["best"] < n
        assert r["pixels"].shape == (n * side,)
        assert r["pixels"].dtype == np.uint8
        assert r["quality"].shape == (n * len(fq.QI),)
    # the same arguments render the same series; another crop range, other ones
    again = fx.extra_series(["coffee", "coins"], 4, (0.02, 0.5), fold=0)
    assert all(np.array_equal(a["pixels"], b["pixels"]) for a, b in zip(rows, again, strict=True))
    wide = fx.extra_series(["coffee", "coins"], 4, (0.5, 0.9), fold=0)
    assert not any(
        np.array_equal(a["pixels"], b["pixels"]) for a, b in zip(rows, wide, strict=True)
    )


def test_selection_rules_pool_each_rules_epoch(fq: ModuleType) -> None:
    def row(hist: list[tuple[float, float, float]], n: int) -> dict[str, Any]:
        epochs = [
            {"epoch": i, "val_top1": v, "val_nll": loss, "test_top1": t}
            for i, (v, loss, t) in enumerate(hist)
        ]
        return {"test": {"n_series": n}, "epochs": epochs}

    folds = {
        # best val top-1: epoch 1 (the first of the tie with 2); lowest val loss: epoch 0
        "0": {"rows": {"m": row([(0.5, 0.9, 0.6), (0.7, 1.0, 0.5), (0.7, 1.1, 0.4)], 100)}},
        # best val top-1 and lowest loss: epoch 2, which is also the last
        "1": {"rows": {"m": row([(0.1, 2.0, 0.2), (0.2, 1.5, 0.3), (0.3, 1.0, 0.9)], 300)}},
    }
    got = fq.selection_rules(folds, ["m"])
    assert got == {
        "m": {
            "val_top1": round(100 * (0.5 * 100 + 0.9 * 300) / 400, 1),
            "val_loss": round(100 * (0.6 * 100 + 0.9 * 300) / 400, 1),
            "last": round(100 * (0.4 * 100 + 0.9 * 300) / 400, 1),
        }
    }
    folds["1"]["rows"]["m"].pop("epochs")  # a part written before the history: left out
    assert fq.selection_rules(folds, ["m"]) == {}


def test_patch_shuffle_moves_whole_tokens_the_same_way_for_a_series(
    fq: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--patch-shuffle: the tower sees the same patch embeddings in other places, permuted alike
    for every shot of a series (and a row trains with it)."""
    rng = np.random.default_rng(0)
    pixels = torch.as_tensor(rng.integers(0, 256, (5, 3, 64, 64), dtype=np.uint8))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = fq.shuffle_patches(pixels, mask, np.random.default_rng(1), 8)

    def tokens(px: torch.Tensor) -> torch.Tensor:  # (N, 64 patches, 192)
        return px.reshape(len(px), 3, 8, 8, 8, 8).permute(0, 2, 4, 1, 3, 5).reshape(len(px), 64, -1)

    before, after = tokens(pixels), tokens(out)
    perms = []
    for i in range(5):
        perm = [int((before[i] == t).all(1).nonzero()[0]) for t in after[i]]
        assert torch.equal(after[i], before[i][perm])
        perms.append(perm)
    assert perms[0] == perms[1] == perms[2]  # series 0's three shots
    assert perms[3] == perms[4]
    assert perms[0] != perms[3]
    assert perms[0] != list(range(64))

    monkeypatch.setitem(fq.SETTINGS, "epochs", 1)
    monkeypatch.setitem(fq.SETTINGS, "patch_shuffle", True)
    data = {"train": _rows(8, 0), "val": _rows(4, 1), "test": _rows(4, 2)}
    train_q = np.concatenate([r["quality"].reshape(3, -1) for r in data["train"]])
    val, _, _, _, _ = fq.train_one("lora", "embedding", data, train_q, seed=0)
    assert val.n_series == 4


def test_the_conv_adapter_starts_as_the_base_tower_and_trains(
    fq: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--conv-adapter: the branch's output convolution starts at zero (the tower is the base
    model), its output matches the patch grid, and a fine-tuned row trains its parameters."""
    rc = _config()
    model = TunedRanker.build(rc, device="cpu").model.eval()
    rng = np.random.default_rng(0)
    pixels = torch.as_tensor(rng.integers(0, 256, (3, 3, 64, 64), dtype=np.uint8))
    mask = torch.tensor([[True, True, True]])
    with torch.no_grad():
        before = model(pixels, mask, None)
        visual = model.tower.visual
        visual.conv1 = fq.ConvAdapter(visual.conv1, 8)
        assert torch.equal(model(pixels, mask, None), before)
        x = torch.randn(2, 3, 64, 64)
        assert visual.conv1(x).shape == visual.conv1.conv1(x).shape == (2, 128, 8, 8)
        visual.conv1.out.weight.fill_(0.01)
        assert not torch.equal(model(pixels, mask, None), before)

    monkeypatch.setitem(fq.SETTINGS, "epochs", 1)
    monkeypatch.setitem(fq.SETTINGS, "conv_adapter", 8)
    data = {"train": _rows(8, 0), "val": _rows(4, 1), "test": _rows(4, 2)}
    train_q = np.concatenate([r["quality"].reshape(3, -1) for r in data["train"]])
    _, _, with_adapter, _, _ = fq.train_one("last-blocks+lora", "embedding", data, train_q, 0)
    monkeypatch.setitem(fq.SETTINGS, "conv_adapter", 0)
    _, _, without, _, _ = fq.train_one("last-blocks+lora", "embedding", data, train_q, 0)
    branch = 3 * 8 * 9 + 8 + 8 * 8 * 9 + 8 + 8 * 16 * 9 + 16 + 16 * 16 * 9 + 16 + 16 * 128 + 128
    assert with_adapter - without == branch
