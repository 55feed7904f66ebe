"""keeper index re-run with other parameters into an existing index: refused, never ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from keeper_core import storage
from keeper_core.errors import ConfigError
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs.embed import write_batch
from keeper_train.jobs.index import IndexConfig, run


def write_table(dst: str, sizes: list[int]) -> None:
    """Parts as keeper embed writes them (its own writer), unit rows of random directions."""
    rng = np.random.default_rng(0)
    for p, n in enumerate(sizes):
        emb = rng.normal(size=(n, 64)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        batch = {
            "image_uri": np.array([f"s3://photos/{p}/{i}.jpg" for i in range(n)], dtype=object),
            "image_id": np.array([f"{p:04x}{i:04x}" for i in range(n)], dtype=object),
            "embedding": emb,
            "t_decode": np.zeros(n),
            "t_embed": np.zeros(n),
        }
        for name in FEATURE_NAMES:
            batch[name] = rng.integers(1, 4000, n) if name in ("width", "height") else rng.random(n)
        write_batch(
            batch, spec="keeper-tiny:random", embeddings_dir=storage.join(dst, "embeddings")
        )


def test_index_rerun_with_other_params_is_refused(tmp_path: Path) -> None:
    table = str(tmp_path / "emb")
    write_table(table, [40, 40])
    first = run(IndexConfig(table=table, backend="exact", dtype="f16"))
    assert (first.dtype, first.rows, first.added) == ("f16", 80, 80)

    # The same command again: nothing to add, the index as it was.
    again = run(IndexConfig(table=table, backend="exact", dtype="f16"))
    assert (again.dtype, again.rows, again.added, again.stale) == ("f16", 80, 0, 0)
    # No parameter given: grows what is there.
    plain = run(IndexConfig(table=table))
    assert (plain.backend, plain.dtype, plain.rows) == ("exact", "f16", 80)

    # Asked for f32: the f16 index was grown and reported as f16, the setting ignored silently.
    with pytest.raises(ConfigError, match=r"dtype=f32 \(the index has f16\).*rebuild=true"):
        run(IndexConfig(table=table, backend="exact", dtype="f32"))
    with pytest.raises(ConfigError, match="target_recall"):
        run(IndexConfig(table=table, target_recall=0.9))
    # HNSW-only parameters mean nothing to an exact index: not a reason to refuse.
    run(IndexConfig(table=table, backend="exact", m=16))

    rebuilt = run(IndexConfig(table=table, backend="exact", dtype="f32", rebuild=True))
    assert (rebuilt.dtype, rebuilt.rows, rebuilt.added) == ("f32", 80, 80)
    assert run(IndexConfig(table=table, dtype="f32")).dtype == "f32"
