"""What ``TunedRanker.trained_state`` returns is a snapshot, not the live weights."""

from __future__ import annotations

import pytest
import torch

from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig
from keeper_core.models import embed_dim
from keeper_core.ranker import RankerConfig
from keeper_core.tower import TowerConfig, TuneMethod

SPEC = "keeper-tiny:random"


@pytest.mark.parametrize("method", ["lora", "last-blocks", "last-blocks+lora"])
def test_trained_state_is_a_snapshot_of_the_weights(method: TuneMethod) -> None:
    """The fine-tune job keeps the best epoch as ``trained_state()``; on a CPU worker every
    tensor of it was the live parameter (``.detach().cpu()`` copies nothing there), so the
    "best" weights followed every later optimizer step and the registered model was the last
    epoch's, whatever epoch early stopping reported."""
    d = embed_dim(SPEC)
    rc = RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=d, hidden=16),
        features="embedding",
        embedding_spec=SPEC,
        embed_dim=d,
        tower=TowerConfig(base_spec=SPEC, method=method, rank=4),
    )
    ranker = TunedRanker.build(rc, device="cpu", seed=0)
    state = ranker.trained_state()
    before = {k: {n: t.clone() for n, t in part.items()} for k, part in state.items()}
    trainable = [p for p in ranker.model.parameters() if p.requires_grad]
    assert trainable
    with torch.no_grad():
        for p in trainable:
            p.add_(1.0)
    for kind, part in state.items():
        for name, t in part.items():
            assert torch.equal(t, before[kind][name]), f"{kind}/{name} moved with the weights"
    # and a fresh snapshot does see the change
    after = ranker.trained_state()
    assert any(not torch.equal(after[k][n], before[k][n]) for k in after for n in after[k])
