"""A fine-tuned ranker loads only onto the base weights it was tuned on.

Its artifact holds what trained (adapters, unfrozen blocks, head), not the base: that is loaded
by ``tower.base_spec``, a name. A checkpoint re-exported to the same path, or an S3 object
overwritten, kept the name, and the adapters loaded silently onto other weights (max |embedding
difference| 0.17 in the review's reproduction). ``tower.base_weights`` records the version as
``keeper embed`` tables do (``weights_version``), and loading checks it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from keeper_core import storage
from keeper_core.errors import ModelLoadError
from keeper_core.finetune import TunedRanker, tower_id
from keeper_core.heads import HeadConfig
from keeper_core.models import load_clip, save_checkpoint, weights_version
from keeper_core.ranker import CONFIG_FILE, RankerConfig
from keeper_core.tower import TowerConfig


def _config(spec: str, version: str | None) -> RankerConfig:
    return RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=64, hidden=16, layers=1, dropout=0.0),
        features="embedding",
        embedding_spec=spec,
        embed_dim=64,
        tower=TowerConfig(base_spec=spec, base_weights=version, method="lora", rank=4),
    )


def _other_weights(seed: int) -> torch.nn.Module:
    model = load_clip("keeper-tiny:random", "cpu").model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.visual.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _tuned(cfg: RankerConfig) -> TunedRanker:
    """A ranker whose adapters moved, as training would move them."""
    ranker = TunedRanker.build(cfg, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ranker.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ranker


def test_a_replaced_base_file_is_refused_naming_both_versions(tmp_path: Path) -> None:
    """The review's reproduction: built from a config that records nothing (as a caller of the
    core API writes it), the ranker pins the weights it was built on."""
    base = tmp_path / "tuned-v1.safetensors"
    save_checkpoint(_other_weights(0), base)
    spec = f"keeper-tiny:{base}"
    v1 = weights_version(spec)
    assert v1 is not None
    assert v1.startswith("sha256:")
    ranker = _tuned(_config(spec, None))
    px = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), np.uint8)
    before = ranker.embed_pixels(px)
    folder = ranker.save(tmp_path / "ranker")
    assert json.loads((folder / CONFIG_FILE).read_text())["tower"]["base_weights"] == v1
    # Unchanged: loads, and embeds as it did.
    again = TunedRanker.load(folder, device="cpu")
    np.testing.assert_array_equal(again.embed_pixels(px), before)

    save_checkpoint(_other_weights(1), base)  # a later export to the same path
    v2 = weights_version(spec)
    assert v2 != v1
    with pytest.raises(ModelLoadError) as e:
        TunedRanker.load(folder, device="cpu")
    assert str(base) in str(e.value)
    assert v1 in str(e.value)
    assert v2 is not None
    assert v2 in str(e.value)
    with pytest.raises(ModelLoadError, match="replaced"):  # the merge of keeper export too
        ranker.merged_state_dict()


def test_a_replaced_base_object_on_s3_is_refused(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEPER_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/bases/tiny.safetensors"
    local = tmp_path / "tiny.safetensors"
    save_checkpoint(_other_weights(0), local)
    storage.write_bytes(uri, local.read_bytes())
    spec = f"keeper-tiny:{uri}"
    v1 = weights_version(spec)
    assert v1 is not None
    assert v1.startswith("etag:")
    folder = _tuned(_config(spec, None)).save(tmp_path / "ranker")
    assert json.loads((folder / CONFIG_FILE).read_text())["tower"]["base_weights"] == v1
    TunedRanker.load(folder, device="cpu")

    save_checkpoint(_other_weights(1), local)
    storage.write_bytes(uri, local.read_bytes())
    with pytest.raises(ModelLoadError, match=rf"{v1}.*now holds etag:"):
        TunedRanker.load(folder, device="cpu")


def test_the_base_version_is_part_of_the_tower_id(tmp_path: Path) -> None:
    base = tmp_path / "b.safetensors"
    save_checkpoint(_other_weights(0), base)
    spec = f"keeper-tiny:{base}"
    ranker = _tuned(_config(spec, weights_version(spec)))
    state = ranker.trained_state()
    ids = {
        version: tower_id(_config(spec, version), state["adapter"], state["blocks"])
        for version in ("sha256:aa", "sha256:bb", None)
    }
    assert len(set(ids.values())) == 3


def test_an_artifact_from_before_the_record_loads_unchecked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ranker.json without base_weights (every artifact saved before it existed): it loads, its
    tower_id is the one it was saved with, and a log line says the base is not checked."""
    base = tmp_path / "b.safetensors"
    save_checkpoint(_other_weights(0), base)
    spec = f"keeper-tiny:{base}"
    ranker = _tuned(_config(spec, None))
    folder = ranker.save(tmp_path / "ranker")
    # What an older keeper wrote: no base_weights, and the tower_id of a config without it.
    old = _config(spec, None)
    state = ranker.trained_state()
    saved = json.loads((folder / CONFIG_FILE).read_text())
    del saved["tower"]["base_weights"]
    saved["embedding_spec"] = tower_id(old, state["adapter"], state["blocks"])
    (folder / CONFIG_FILE).write_text(json.dumps(saved))
    save_checkpoint(_other_weights(1), base)
    with caplog.at_level("INFO", logger="keeper_core.finetune"):
        loaded = TunedRanker.load(folder, device="cpu")
    assert loaded.config.embedding_spec == saved["embedding_spec"]
    assert loaded.config.tower is not None
    assert loaded.config.tower.base_weights is None  # as saved: not pinned to today's weights
    assert "records no version of its base" in caplog.text


def test_without_a_record_the_tower_id_is_the_one_keeper_computed_before() -> None:
    """Random init and hub tags record no version (nothing to pin), nor do older artifacts: their
    tower_id hashes the tower config's JSON as it was before the field existed."""
    spec = "keeper-tiny:random"
    cfg = _config(spec, None)
    state = _tuned(cfg).trained_state()
    assert cfg.tower is not None
    old_json = json.dumps(
        {k: v for k, v in cfg.tower.model_dump(mode="json").items() if k != "base_weights"},
        separators=(",", ":"),
    )
    h = hashlib.sha256(old_json.encode())
    for part in (state["adapter"], state["blocks"]):
        for k in sorted(part):
            h.update(k.encode())
            h.update(part[k].float().numpy().tobytes())
    assert tower_id(cfg, state["adapter"], state["blocks"]) == (f"{spec}+lora#{h.hexdigest()[:12]}")
