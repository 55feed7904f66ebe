"""Fine-tuning a timm ViT tower (open_clip's TimmModel: SigLIP's layout) through keeper's tower.

The tower is timm's ``test_vit`` (6 blocks, width 64, 160 px, a MAP attention pool, random init)
inside an open_clip CLIP with a logit bias, registered with open_clip for this module: what
SigLIP's configs build, small. Expectations are computed from the plain tower's own modules.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support import register_tiny_variant
from torch import nn

from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import ConfigError
from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig, series_softmax_loss
from keeper_core.models import LoadedClip, load_clip
from keeper_core.ranker import RankerConfig, load_ranker
from keeper_core.tower import (
    TIMM_VIT,
    TowerConfig,
    apply_tuning,
    base_name,
    lora_targets,
    tower_layout,
)

ARCH = "keeper-tiny-timm-test"  # no "siglip" in it: open_clip would fetch SigLIP's tokenizer
SPEC = f"{ARCH}:random"
B = "trunk.blocks"
BLOCKS = 6  # timm's test_vit
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
SIZE = 160
EMBED_DIM = 64


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory: pytest.TempPathFactory) -> None:
    vision = {"image_size": SIZE, "timm_model_name": "test_vit", "timm_model_pretrained": False}
    register_tiny_variant(
        tmp_path_factory.mktemp("configs"),
        ARCH,
        init_logit_bias=-10,
        vision_cfg={**vision, "timm_pool": "map", "timm_proj": "none"},
    )


@pytest.fixture(scope="module")
def plain() -> nn.Module:
    visual: nn.Module = load_clip(SPEC, "cpu").model.visual
    return visual


def tower(method: str = "lora", **kw: Any) -> TowerConfig:
    return TowerConfig(base_spec=SPEC, method=method, **kw)


def build(method: str, **kw: Any) -> TunedRanker:
    config = RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=EMBED_DIM, hidden=16, layers=1, dropout=0.0),
        features="embedding",
        embedding_spec=SPEC,
        embed_dim=EMBED_DIM,
        tower=tower(method, **kw),
    )
    return TunedRanker.build(config, device="cpu")


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


def perturb(ranker: TunedRanker) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ranker.model.tower.visual.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def expected(plain: nn.Module, lora_blocks: list[int], unfrozen: list[int], r: int) -> dict:
    """Trainable name -> shape: A (r, in) and B (out, r) per adapted Linear; every parameter of
    an unfrozen block, and with any, those after the blocks (norms, the MAP pool, the head)."""
    modules = dict(plain.named_modules())
    out: dict[str, tuple[int, ...]] = {}
    for i in lora_blocks:
        for m in LINEARS:
            lin = modules[f"{B}.{i}.{m}"]
            assert isinstance(lin, nn.Linear)
            out[f"{B}.{i}.{m}.lora_A.default.weight"] = (r, lin.in_features)
            out[f"{B}.{i}.{m}.lora_B.default.weight"] = (lin.out_features, r)
    after = ("trunk.norm.", "trunk.fc_norm.", "trunk.attn_pool.", "head.")
    for name, p in plain.named_parameters():
        block = name.startswith(tuple(f"{B}.{i}." for i in unfrozen))
        if block or (unfrozen and name.startswith(after)):
            out[name] = tuple(p.shape)
    return out


CASES = [
    pytest.param("lora", {"rank": 4}, list(range(BLOCKS)), [], id="lora-every-block"),
    pytest.param("lora", {"rank": 2, "lora_blocks": 2}, [4, 5], [], id="lora-last-2"),
    pytest.param("last-blocks", {}, [], [5], id="last-blocks"),
    pytest.param("last-blocks+lora", {"rank": 2, "lora_blocks": 1}, [4], [5], id="last+lora"),
]


@pytest.mark.parametrize(("method", "fields", "lora_blocks", "unfrozen"), CASES)
def test_a_timm_tower_trains_exactly_its_blocks_linears_and_what_follows_them(
    plain: nn.Module,
    method: str,
    fields: dict[str, Any],
    lora_blocks: list[int],
    unfrozen: list[int],
) -> None:
    assert tower_layout(plain) is TIMM_VIT
    config = tower(method, **fields)
    want = expected(plain, lora_blocks, unfrozen, config.rank)
    visual = copy.deepcopy(plain)

    parts = apply_tuning(visual, config)

    got = {n: tuple(p.shape) for n, p in visual.named_parameters() if p.requires_grad}
    assert got == want
    assert parts.blocks == unfrozen
    assert parts.count() == sum(math.prod(s) for s in want.values())
    if unfrozen:  # the attention pool and the final norm train with the last block
        assert any(n.startswith("trunk.attn_pool.") for n in got)
        assert any(n.startswith("trunk.norm.") for n in got)
    frozen = {base_name(n) for n, p in visual.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in plain.named_parameters()} - set(want)


def test_a_target_a_timm_tower_lacks_is_named_with_what_its_blocks_hold(plain: nn.Module) -> None:
    with pytest.raises(ConfigError, match=r"'trunk\.blocks\.0\.attn\.c_fc'.*timm ViT.*attn\.qkv"):
        apply_tuning(copy.deepcopy(plain), tower(lora_modules=("attn.c_fc",)))


def test_training_moves_only_what_trains(plain: nn.Module) -> None:
    ranker = build("last-blocks+lora", rank=2, lora_blocks=2)
    model = ranker.model
    before = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    px = torch.as_tensor(pixels(4))
    mask = torch.ones(2, 2, dtype=torch.bool)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        series_softmax_loss(model(px, mask), mask, torch.tensor([0, 1])).backward()
        opt.step()
    model.eval()
    visual = model.tower.visual
    tuned = {base_name(n) for n, p in visual.named_parameters() if p.requires_grad}
    after = {base_name(k): v for k, v in visual.state_dict().items() if ".lora_" not in k}
    moved = [k for k in sorted(set(after) - tuned) if not torch.equal(after[k], before[k])]
    assert moved == []


def test_merged_checkpoint_and_saved_adapter_give_the_tuned_embeddings(tmp_path: Path) -> None:
    ranker = build("last-blocks+lora", rank=4, lora_blocks=3)
    perturb(ranker)
    px = pixels(3, seed=2)
    tuned = ranker.embed_pixels(px)
    base = ClipEmbedder(SPEC, device="cpu").embed_pixels(px)
    assert np.abs(tuned - base).max() > 1e-3  # the tuning reached the embeddings

    merged = ranker.merged_state_dict()
    save_file(merged, str(tmp_path / "merged.safetensors"))
    loaded = ClipEmbedder(f"{ARCH}:{tmp_path / 'merged.safetensors'}", device="cpu")
    np.testing.assert_allclose(loaded.embed_pixels(px), tuned, rtol=0, atol=1e-5)

    folder = ranker.save(tmp_path / "ranker")
    again = load_ranker(folder, device="cpu")
    assert isinstance(again, TunedRanker)
    for a, b in zip(again.score(px, None, [2, 1]), ranker.score(px, None, [2, 1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_the_open_clip_vit_keeps_its_layout() -> None:
    clip: LoadedClip = load_clip("keeper-tiny:random", "cpu")
    assert tower_layout(clip.model.visual).blocks == "transformer.resblocks"


def test_the_shipped_finetune_config_takes_each_towers_own_lora_modules(tmp_path: Path) -> None:
    # It named open_clip's modules: `--config finetune.yaml model=<a SigLIP>` was refused
    # ("LoRA target 'trunk.blocks.0.attn' is a Attention").
    from keeper_train.config import load_config
    from keeper_train.jobs.finetune import FinetuneConfig

    shipped = Path(__file__).parents[3] / "packages" / "train" / "configs" / "finetune.yaml"
    cfg = load_config(FinetuneConfig, shipped, [f"series={tmp_path / 's.csv'}", f"model={SPEC}"])
    assert cfg.lora_modules is None
    visual = load_clip(SPEC, "cpu").model.visual
    targets = lora_targets(visual, tower(lora_modules=cfg.lora_modules))
    assert targets
    assert all(t.endswith(LINEARS) for t in targets)
