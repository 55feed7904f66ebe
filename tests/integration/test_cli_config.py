"""`keeper embed --config FILE` runs the model the file names (a flag's default used to replace it
with keeper-tiny:random, so the table silently held random-weight embeddings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from keeper_core import storage
from keeper_core.cli import main as keeper
from keeper_core.models import load_clip, save_checkpoint
from keeper_core.synthetic import generate_corpus
from keeper_train.jobs import embed

pytestmark = pytest.mark.integration


def test_embed_uses_the_model_the_config_names(ray_cluster: str, tmp_path: Path) -> None:
    clip = load_clip("keeper-tiny:random", "cpu")
    with torch.no_grad():  # weights unlike the seeded random init
        gen = torch.Generator().manual_seed(7)
        for p in clip.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    weights = save_checkpoint(clip.model, tmp_path / "tiny.safetensors")
    spec = f"keeper-tiny:{weights}"
    manifest = generate_corpus(tmp_path / "corpus", n_series=3, seed=4, image_size=(96, 72))
    config = tmp_path / "embed.yaml"
    config.write_text(
        f"input: {manifest}\noutput: {tmp_path / 'emb'}\nmodel: {spec}\n"
        f"ray_address: {ray_cluster}\nbatch_size: 8\n"
    )

    assert keeper(["embed", "--config", str(config)]) == 0

    summary = json.loads((tmp_path / "emb" / embed.SUMMARY).read_text())
    assert summary["model_spec"] == spec
    assert json.loads((tmp_path / "emb" / embed.TABLE_META).read_text())["model_spec"] == spec
    table = storage.read_parquet(str(tmp_path / "emb" / embed.EMBEDDINGS)).to_pandas()
    assert set(table["model_spec"]) == {spec}
    assert summary["counts"]["embedded"] == len(table) > 0

    # The vectors are that checkpoint's, not random init's: a random-weight table of the same
    # images (a flag typed on the command line still wins over the file) differs.
    argv = ["embed", "--config", str(config), "--model", "keeper-tiny:random"]
    assert keeper([*argv, "--output", str(tmp_path / "emb-random")]) == 0
    rand = storage.read_parquet(str(tmp_path / "emb-random" / embed.EMBEDDINGS)).to_pandas()
    assert set(rand["model_spec"]) == {"keeper-tiny:random"}
    mine = np.stack(list(table.sort_values("image_uri")["embedding"]))
    theirs = np.stack(list(rand.sort_values("image_uri")["embedding"]))
    assert mine.shape == theirs.shape
    assert not np.allclose(mine, theirs, atol=1e-3)
