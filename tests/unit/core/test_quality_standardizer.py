"""Quality features standardised by the train rows: a column constant there contributes nothing.

The head never saw such a column move, so its weight on it is its random start; with the std
floored (1e-6, before) a held-out shot with 0.5 % crushed blacks fed the head a feature of 5,000.
The same holds for a fine-tuned ranker's standardisation (keeper_core.finetune.TunedRankerModel).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from keeper_core.finetune import TunedRankerModel
from keeper_core.heads import HeadConfig
from keeper_core.ranker import RankerConfig, feature_matrix, fit_standardizer, inverse_std


def config(mean: list[float], std: list[float]) -> RankerConfig:
    return RankerConfig(
        head=HeadConfig(kind="linear", in_dim=2),
        features="quality",
        embedding_spec="keeper-tiny:random",
        embed_dim=0,
        quality_names=["sharpness", "clip_dark"],
        quality_mean=mean,
        quality_std=std,
    )


def test_a_column_constant_in_training_contributes_nothing() -> None:
    rng = np.random.default_rng(0)
    train = np.stack([rng.normal(5.0, 2.0, 100), np.zeros(100)], axis=1)
    mean, std = fit_standardizer(train)
    assert std[1] == 0.0
    assert abs(std[0] - train[:, 0].std()) < 1e-12
    held_out = pd.DataFrame({"sharpness": [5.0, 9.0], "clip_dark": [0.0, 0.005]})
    x = feature_matrix(held_out, config(mean, std))
    assert x[:, 1].tolist() == [0.0, 0.0]
    assert np.allclose(x[:, 0], (held_out["sharpness"] - mean[0]) / std[0])
    # A column of large values that does vary is standardised, not taken for a constant one.
    big = np.stack([1e6 + rng.normal(0, 1.0, 100), rng.normal(0, 1, 100)], axis=1)
    assert min(fit_standardizer(big)[1]) > 0.5


def test_models_saved_with_a_floored_std_read_as_they_were() -> None:
    assert inverse_std([2.0, 1e-6, 0.0]).tolist() == [0.5, 1e6, 0.0]


def test_a_fine_tuned_ranker_standardises_alike() -> None:
    cfg = RankerConfig(
        head=HeadConfig(kind="linear", in_dim=3),
        features="embedding+quality",
        embedding_spec="keeper-tiny:random",
        embed_dim=1,
        quality_names=["sharpness", "clip_dark"],
        quality_mean=[5.0, 0.0],
        quality_std=[2.0, 0.0],
    )
    seen: list[torch.Tensor] = []

    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.sum(-1)

    ranker = TunedRankerModel(torch.nn.Identity(), Head(), cfg)  # type: ignore[arg-type]
    emb = torch.zeros(2, 1)
    quality = torch.tensor([[9.0, 0.005], [5.0, 0.0]])
    ranker.score_embeddings(emb, torch.ones(1, 2, dtype=torch.bool), quality)
    assert seen[0][0, :, 1:].tolist() == [[2.0, 0.0], [0.0, 0.0]]
