"""Fine-tuned rankers (keeper_core.tower + keeper_core.finetune): what trains, what stays frozen,
what is saved, what merges, and how a tuned ranker ranks images.

Every expectation is computed here from the plain tower's own modules and shapes, never taken
from the code under test alone. keeper-tiny:random is a 2-block ViT (width 128, 64 px input).
"""

from __future__ import annotations

import copy
import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import ConfigError, DataError, ModelLoadError
from keeper_core.finetune import ADAPTER_FILE, BLOCKS_FILE, TunedRanker
from keeper_core.heads import HeadConfig, series_softmax_loss
from keeper_core.models import LoadedClip, load_clip
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    RankerConfig,
    SeriesRanker,
    load_ranker,
    read_config,
)
from keeper_core.tower import TowerConfig, apply_tuning, base_name, lora_parameter_count

SPEC = "keeper-tiny:random"
B = "transformer.resblocks"
EMBED_DIM = 64  # keeper-tiny's embed_dim (model_configs/keeper-tiny.json)
SIZE = 64
QUALITY = ["sharpness", "brightness", "contrast"]


@pytest.fixture(scope="module")
def base_clip() -> LoadedClip:
    """The plain model. Never tuned in place: tests deep-copy its tower or build their own."""
    return load_clip(SPEC, "cpu")


@pytest.fixture(scope="module")
def base_visual_state(base_clip: LoadedClip) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in base_clip.model.visual.state_dict().items()}


def tower(method: str = "lora", **kw: Any) -> TowerConfig:
    return TowerConfig(base_spec=SPEC, method=method, **kw)


def ranker_config(t: TowerConfig, quality: list[str] | None = None) -> RankerConfig:
    q = quality or []
    return RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=EMBED_DIM + len(q), hidden=32, layers=1, dropout=0.0),
        features="embedding+quality" if q else "embedding",
        embedding_spec=SPEC,
        embed_dim=EMBED_DIM,
        quality_names=q,
        quality_mean=[5.0, 0.5, 0.2][: len(q)],
        quality_std=[2.0, 0.2, 0.1][: len(q)],
        tower=t,
    )


def build(method: str = "lora", quality: list[str] | None = None, **kw: Any) -> TunedRanker:
    return TunedRanker.build(ranker_config(tower(method, **kw), quality), device="cpu")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def perturb(ranker: TunedRanker, seed: int = 1) -> None:
    """Move every trainable tensor (lora_B starts at zero: the adapter would be the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(ranker.model.tower.visual).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


def expected_trainable(
    plain: nn.Module, targets: list[str], blocks: list[int], rank: int
) -> dict[str, tuple[int, ...]]:
    """Trainable parameter name -> shape, from the plain tower's modules.

    LoRA adds A (r, in) and B (out, r) per adapted Linear. peft adapts an MHA's in_proj (d -> 3d)
    on the MHA itself and its out_proj (d -> d) nested under ``base_layer``. Unfrozen blocks train
    every parameter under their plain names, with ln_post and proj.
    """
    modules = dict(plain.named_modules())
    layers: dict[str, tuple[int, int]] = {}
    for t in targets:
        m = modules[t]
        if isinstance(m, nn.MultiheadAttention):
            layers[t] = (m.embed_dim, 3 * m.embed_dim)
            layers[f"{t}.base_layer.out_proj"] = (m.embed_dim, m.embed_dim)
        else:
            assert isinstance(m, nn.Linear)
            layers[t] = (m.in_features, m.out_features)
    out: dict[str, tuple[int, ...]] = {}
    for prefix, (fan_in, fan_out) in layers.items():
        out[f"{prefix}.lora_A.default.weight"] = (rank, fan_in)
        out[f"{prefix}.lora_B.default.weight"] = (fan_out, rank)
    unfrozen = tuple(f"{B}.{i}." for i in blocks)
    for name, p in plain.named_parameters():
        if blocks and (
            name.startswith(unfrozen) or name in ("ln_post.weight", "ln_post.bias", "proj")
        ):
            out[name] = tuple(p.shape)
    return out


def lora_formula(plain: nn.Module, targets: list[str], rank: int) -> int:
    """r * (in + out) per Linear; an MHA of width d: r * 4d (in_proj) + r * 2d (out_proj)."""
    modules = dict(plain.named_modules())
    total = 0
    for t in targets:
        m = modules[t]
        if isinstance(m, nn.MultiheadAttention):
            total += rank * 4 * m.embed_dim + rank * 2 * m.embed_dim
        else:
            total += rank * (m.in_features + m.out_features)
    return total


# --- 1. what trains ----------------------------------------------------------------------------

ALL_MODULES = ["attn", "mlp.c_fc", "mlp.c_proj"]

# id, TowerConfig fields, expected LoRA targets ("block.module"), expected unfrozen blocks
WHAT_TRAINS = [
    ("lora-r2-every-block", {"rank": 2}, [f"{i}.{m}" for i in (0, 1) for m in ALL_MODULES], []),
    ("lora-r4-last-block", {"rank": 4, "lora_blocks": 1}, [f"1.{m}" for m in ALL_MODULES], []),
    ("lora-r8-c_fc", {"rank": 8, "lora_modules": ("mlp.c_fc",)}, ["0.mlp.c_fc", "1.mlp.c_fc"], []),
    ("lora-attn-only", {"rank": 2, "lora_modules": ("attn",), "lora_blocks": 1}, ["1.attn"], []),
    (
        "lora-targets",
        {"rank": 4, "targets": (f"{B}.1.attn", f"{B}.0.mlp.c_proj")},
        ["1.attn", "0.mlp.c_proj"],
        [],
    ),
    ("last-1", {"method": "last-blocks"}, [], [1]),
    ("last-2", {"method": "last-blocks", "unfreeze_blocks": 2}, [], [0, 1]),
    (
        "last+lora-r2",
        {"method": "last-blocks+lora", "rank": 2},
        [f"0.{m}" for m in ALL_MODULES],
        [1],
    ),
    (
        "last+lora-r8-c_fc",
        {"method": "last-blocks+lora", "rank": 8, "lora_blocks": 1, "lora_modules": ("mlp.c_fc",)},
        ["0.mlp.c_fc"],
        [1],
    ),
    (
        "last+lora-targets",
        {"method": "last-blocks+lora", "rank": 4, "targets": (f"{B}.0.attn",)},
        ["0.attn"],
        [1],
    ),
]


@pytest.mark.parametrize(
    ("fields", "targets", "blocks"),
    [pytest.param(f, t, b, id=i) for i, f, t, b in WHAT_TRAINS],
)
def test_exactly_the_intended_parameters_train(
    base_clip: LoadedClip, fields: dict[str, Any], targets: list[str], blocks: list[int]
) -> None:
    plain = base_clip.model.visual
    config = tower(**fields)
    targets = [f"{B}.{t}" for t in targets]
    want = expected_trainable(plain, targets, blocks, config.rank)
    visual = copy.deepcopy(plain)

    parts = apply_tuning(visual, config)

    got = trainable(visual)
    assert sorted(got) == sorted(want)
    assert {n: tuple(p.shape) for n, p in got.items()} == want
    assert sorted(parts.targets) == sorted(targets)
    assert parts.blocks == blocks
    assert set(parts.lora) | set(parts.backbone) == set(got)
    assert not set(parts.lora) & set(parts.backbone)
    # The count, three ways: the shapes above, the closed formula, and the module's own helper.
    unfrozen = sum(p.numel() for n, p in plain.named_parameters() if n in want)
    formula = lora_formula(plain, targets, config.rank) + unfrozen
    assert sum(math.prod(s) for s in want.values()) == formula
    assert sum(p.numel() for p in got.values()) == formula
    assert parts.count() == formula
    assert lora_parameter_count(plain, targets, config.rank) == formula - unfrozen
    # Nothing else moved: every frozen tensor keeps its plain name (modulo peft's base_layer).
    frozen = {base_name(n) for n, p in visual.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in plain.named_parameters()} - set(want)


def test_adapters_start_as_the_identity(base_clip: LoadedClip) -> None:
    plain = base_clip.model.visual
    visual = copy.deepcopy(plain)
    apply_tuning(visual, tower(rank=4))
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(visual(x), plain(x), rtol=0, atol=1e-5)


def test_a_build_depends_on_its_seed_alone() -> None:
    """LoRA's A matrices and the head come from the build's seed, whatever the process drew
    before (a fine-tune run is reproducible from its config, not from its place in a process)."""

    def state(seed: int, draws: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234)
        torch.rand(draws)  # what other code did before the build
        r = TunedRanker.build(ranker_config(tower("lora", rank=4)), device="cpu", seed=seed)
        return {f"{g}.{k}": v for g, part in r.trained_state().items() for k, v in part.items()}

    a, b, other = state(0, 1), state(0, 1000), state(1, 1)
    assert a.keys() == b.keys()
    assert any(".lora_A" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], other[k]) for k in a if ".lora_A" in k)


# --- 2. a wrong target fails early -------------------------------------------------------------

# id, TowerConfig fields, text the ConfigError must carry
WRONG = [
    ("no-such-block", {"targets": (f"{B}.7.attn",)}, f"{B}.7.attn"),
    ("layernorm", {"targets": (f"{B}.0.ln_1",)}, f"'{B}.0.ln_1' is a LayerNorm"),
    ("one-bad-of-two", {"targets": (f"{B}.0.mlp.c_fc", f"{B}.0.mlp.c_gate")}, f"{B}.0.mlp.c_gate"),
    # peft: its forward is never called (the MHA reads its weight), so it would train nothing.
    ("out_proj-alone", {"targets": (f"{B}.0.attn.out_proj",)}, f"{B}.0.attn.out_proj"),
    ("lora_blocks>blocks", {"lora_blocks": 3}, "lora_blocks=3"),
    ("lora_blocks>free", {"method": "last-blocks+lora", "lora_blocks": 2}, "lora_blocks=2"),
    ("no-free-block", {"method": "last-blocks+lora", "unfreeze_blocks": 2}, "lora_blocks"),
    ("unfreeze>blocks", {"method": "last-blocks", "unfreeze_blocks": 3}, "unfreeze_blocks=3"),
    (
        "unfreeze>blocks+lora",
        {"method": "last-blocks+lora", "unfreeze_blocks": 3},
        "unfreeze_blocks=3",
    ),
    (
        "target-in-unfrozen-block",
        {"method": "last-blocks+lora", "targets": (f"{B}.1.attn",)},
        f"{B}.1.attn",
    ),
]


@pytest.mark.parametrize(("fields", "named"), [pytest.param(f, n, id=i) for i, f, n in WRONG])
def test_wrong_target_fails_before_anything_changes(
    base_clip: LoadedClip, fields: dict[str, Any], named: str
) -> None:
    visual = copy.deepcopy(base_clip.model.visual)
    before = _layout(visual)

    with pytest.raises(ConfigError, match=re.escape(named)):
        apply_tuning(visual, tower(**fields))

    assert _layout(visual) == before
    for (n, p), q in zip(
        visual.named_parameters(), base_clip.model.visual.parameters(), strict=True
    ):
        assert torch.equal(p, q), n


def _layout(visual: nn.Module) -> list[tuple[str, str, bool]]:
    """Module kinds and parameter names with their trainable flag: what tuning would change."""
    kinds = [(n, type(m).__name__, True) for n, m in visual.named_modules()]
    return kinds + [(n, "param", p.requires_grad) for n, p in visual.named_parameters()]


def test_build_refuses_a_wrong_target_naming_it() -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{B}.7.attn")):
        build(targets=(f"{B}.7.attn",))


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        pytest.param(
            {"method": "last-blocks", "targets": (f"{B}.0.attn",)},
            "targets",
            id="last-blocks+targets",
        ),
        pytest.param({"lora_modules": ()}, "lora_modules", id="no-modules"),
        pytest.param({"rank": 0}, "rank", id="rank-0"),
        pytest.param({"lora_blocks": 0}, "lora_blocks", id="lora_blocks-0"),
        pytest.param({"unfreeze_blocks": 0}, "unfreeze_blocks", id="unfreeze-0"),
        pytest.param({"method": "full"}, "method", id="unknown-method"),
        pytest.param({"rnak": 4}, "rnak", id="typo"),
    ],
)
def test_invalid_tower_config_is_a_validation_error(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        tower(**fields)
    # The same from ranker.json: a saved config is validated by the same model.
    raw = ranker_config(tower()).model_dump()
    raw["tower"].update(fields)
    with pytest.raises(ValidationError, match=named):
        RankerConfig.model_validate(raw)


# --- 3. frozen stays frozen --------------------------------------------------------------------

METHODS = [
    pytest.param("lora", {}, id="lora"),
    pytest.param("lora", {"lora_modules": ("mlp.c_fc", "mlp.c_proj")}, id="lora-mlp"),
    pytest.param("last-blocks", {}, id="last-blocks"),
    pytest.param("last-blocks+lora", {}, id="last-blocks+lora"),
]


@pytest.fixture
def one_thread() -> Iterator[None]:
    # A 2-block ViT at batch 6: intra-op threads only add contention on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("method", "fields"), METHODS)
def test_frozen_weights_are_bit_identical_after_training(
    base_visual_state: dict[str, torch.Tensor], method: str, fields: dict[str, Any]
) -> None:
    ranker = build(method, **fields)
    model = ranker.model
    params = trainable(model)
    start = {n: p.detach().clone() for n, p in params.items()}
    # weight_decay > 0: AdamW would decay a frozen tensor it was given even without a gradient.
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    pixels = torch.as_tensor(random_pixels(6))
    mask = torch.ones(2, 3, dtype=torch.bool)
    best = torch.tensor([0, 2])
    model.train()
    for _ in range(5):
        opt.zero_grad()
        series_softmax_loss(model(pixels, mask), mask, best).backward()
        opt.step()
    model.eval()

    visual = model.tower.visual
    tuned = {base_name(n) for n in trainable(visual)}
    assert {f"tower.visual.{n}" for n in trainable(visual)} <= set(params)
    after = {base_name(k): v for k, v in visual.state_dict().items() if ".lora_" not in k}
    frozen = set(after) - tuned
    assert set(after) == set(base_visual_state)
    moved = {
        k: float((after[k] - base_visual_state[k]).abs().max())
        for k in sorted(frozen)
        if not torch.equal(after[k], base_visual_state[k])
    }
    assert moved == {}, f"frozen tensors changed by training (max abs change): {moved}"
    still = [n for n, p in params.items() if torch.equal(p.detach(), start[n])]
    assert still == [], f"trainable tensors that never moved: {still}"


# --- 4. merged == unmerged ---------------------------------------------------------------------

MERGE_METHODS = [
    pytest.param("lora", {}, id="lora"),
    pytest.param("lora", {"lora_modules": ("attn",)}, id="lora-attn-only"),
    pytest.param("last-blocks", {}, id="last-blocks"),
    pytest.param("last-blocks+lora", {}, id="last-blocks+lora"),
]


@pytest.fixture(scope="module")
def base_embeddings() -> np.ndarray:
    return ClipEmbedder(SPEC, device="cpu").embed_pixels(random_pixels(4, seed=3))


@pytest.mark.parametrize(("method", "fields"), MERGE_METHODS)
def test_merged_checkpoint_embeds_like_the_adapted_tower(
    tmp_path: Path,
    base_clip: LoadedClip,
    base_embeddings: np.ndarray,
    method: str,
    fields: dict[str, Any],
) -> None:
    ranker = build(method, **fields)
    perturb(ranker)
    pixels = random_pixels(4, seed=3)
    tuned = ranker.embed_pixels(pixels)

    merged = ranker.merged_state_dict()

    base = base_clip.model.state_dict()
    assert set(merged) == set(base)  # a full open_clip checkpoint, loadable as ARCH:PATH
    np.testing.assert_allclose(ranker.embed_pixels(pixels), tuned, rtol=0, atol=1e-6)
    save_file(merged, str(tmp_path / "merged.safetensors"))
    loaded = ClipEmbedder(f"keeper-tiny:{tmp_path / 'merged.safetensors'}", device="cpu")
    np.testing.assert_allclose(loaded.embed_pixels(pixels), tuned, rtol=0, atol=1e-5)
    assert np.abs(tuned - base_embeddings).max() > 1e-3  # the tuning reached the embeddings

    # Exactly the adapted weights and the unfrozen blocks differ from the base.
    plain = dict(base_clip.model.visual.named_modules())
    expect_changed = {
        f"visual.{n}"
        for n in expected_trainable(base_clip.model.visual, [], ranker.parts.blocks, 1)
    }
    for t in ranker.parts.targets:
        if isinstance(plain[t], nn.MultiheadAttention):
            expect_changed |= {f"visual.{t}.in_proj_weight", f"visual.{t}.out_proj.weight"}
        else:
            expect_changed.add(f"visual.{t}.weight")
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == expect_changed
    # The LoRA arithmetic, where peft's is plain: W + alpha / r * B @ A.
    visual = ranker.model.tower.visual
    assert ranker.config.tower is not None
    scale = ranker.config.tower.alpha / ranker.config.tower.rank
    for t in ranker.parts.targets:
        mod = visual.get_submodule(t)
        delta = scale * mod.lora_B["default"].weight @ mod.lora_A["default"].weight
        key = (
            f"{t}.in_proj_weight" if isinstance(plain[t], nn.MultiheadAttention) else f"{t}.weight"
        )
        torch.testing.assert_close(
            merged[f"visual.{key}"], base[f"visual.{key}"] + delta.detach(), rtol=0, atol=1e-5
        )


# --- 5. save / load ----------------------------------------------------------------------------

SAVED_METHODS = ("lora", "last-blocks", "last-blocks+lora")
FILES = {CONFIG_FILE, WEIGHTS_FILE, ADAPTER_FILE, BLOCKS_FILE}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[np.ndarray]]]:
    """One saved ranker per method, with the scores it gave before saving (read-only: copy it)."""
    out = {}
    pixels = random_pixels(5, seed=4)
    for method in SAVED_METHODS:
        ranker = build(method)
        perturb(ranker)
        with torch.no_grad():
            for p in ranker.model.head.parameters():
                p.add_(0.1)
        folder = ranker.save(tmp_path_factory.mktemp(method.replace("+", "-")))
        out[method] = (folder, ranker.score(pixels, None, [3, 2]))
    return out


@pytest.mark.parametrize("method", SAVED_METHODS)
def test_save_load_round_trip(
    base_clip: LoadedClip, saved: dict[str, tuple[Path, list[np.ndarray]]], method: str
) -> None:
    folder, scores = saved[method]
    assert {p.name for p in folder.iterdir()} == FILES

    loaded = load_ranker(folder, device="cpu")

    assert isinstance(loaded, TunedRanker)
    got = loaded.score(random_pixels(5, seed=4), None, [3, 2])
    for g, s in zip(got, scores, strict=True):
        np.testing.assert_allclose(g, s, rtol=0, atol=1e-6)
    spec = loaded.config.embedding_spec
    assert spec is not None
    assert re.fullmatch(rf"{re.escape(SPEC)}\+{re.escape(method)}#[0-9a-f]{{12}}", spec)
    assert read_config(folder).embedding_spec == spec
    # Only what trained is saved: LoRA tensors under peft's names, unfrozen ones under plain names.
    plain = base_clip.model.visual
    want = expected_trainable(plain, loaded.parts.targets, loaded.parts.blocks, 8)
    peft_names = {k.replace(".default", "") for k in want if ".lora_" in k}
    assert set(load_file(str(folder / ADAPTER_FILE))) == peft_names
    assert set(load_file(str(folder / BLOCKS_FILE))) == {k for k in want if ".lora_" not in k}
    assert bool(peft_names) == (method != "last-blocks")


def test_lora_artifact_is_far_smaller_than_the_model(
    base_clip: LoadedClip, saved: dict[str, tuple[Path, list[np.ndarray]]]
) -> None:
    folder, _ = saved["lora"]
    model_bytes = sum(v.numel() * v.element_size() for v in base_clip.model.state_dict().values())
    tower_bytes = sum(
        v.numel() * v.element_size() for v in base_clip.model.visual.state_dict().values()
    )
    adapter = (folder / ADAPTER_FILE).stat().st_size
    assert adapter < 0.25 * model_bytes
    assert sum(p.stat().st_size for p in folder.iterdir()) < 0.25 * tower_bytes


@pytest.mark.parametrize(
    ("method", "file"),
    [
        ("lora", ADAPTER_FILE),
        ("last-blocks", BLOCKS_FILE),
        ("last-blocks+lora", ADAPTER_FILE),
        ("last-blocks+lora", BLOCKS_FILE),
    ],
)
def test_tampered_or_missing_tensors_are_refused(
    tmp_path: Path, saved: dict[str, tuple[Path, list[np.ndarray]]], method: str, file: str
) -> None:
    source, _ = saved[method]
    tensors = load_file(str(source / file))
    key = sorted(tensors)[0]

    tampered = shutil.copytree(source, tmp_path / "tampered")
    save_file({**tensors, key: tensors[key] + 0.5}, str(tampered / file))
    with pytest.raises(ModelLoadError, match=re.escape("not the ones ranker.json names")):
        load_ranker(tampered, device="cpu")

    missing = shutil.copytree(source, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != key}, str(missing / file))
    with pytest.raises(ModelLoadError, match=re.escape(key)):
        load_ranker(missing, device="cpu")


def test_series_ranker_load_points_a_tuned_folder_at_load_ranker(
    saved: dict[str, tuple[Path, list[np.ndarray]]],
) -> None:
    with pytest.raises(DataError, match="load_ranker"):
        SeriesRanker.load(saved["lora"][0])


# --- 6. ranking images -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Five small photos, JPEG and PNG, of different sizes and content."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    uris = []
    for i, (w, h, fmt) in enumerate(
        [(96, 72, "JPEG"), (80, 80, "PNG"), (72, 96, "JPEG"), (64, 48, "PNG"), (120, 90, "JPEG")]
    ):
        ramp = np.linspace(0, 255 * (i + 1) / 5, w)[None, :, None]
        noise = rng.normal(0, 10 * i + 5, (h, w, 3))
        rgb = np.clip(ramp + noise, 0, 255).astype(np.uint8)
        path = d / f"p{i}.{fmt.lower()}"
        Image.fromarray(rgb, "RGB").save(path, fmt)
        uris.append(str(path))
    return uris


def photo_table(uris: list[str]) -> pd.DataFrame:
    # Series interleaved (b a a b a) and a shuffled index: order must come back as given.
    return pd.DataFrame(
        {"series_id": ["b", "a", "a", "b", "a"], "image_uri": uris}, index=[40, 10, 30, 20, 0]
    )


@pytest.mark.parametrize(
    ("quality", "given"),
    [
        pytest.param(None, False, id="embedding"),
        pytest.param(QUALITY, True, id="quality-given"),
        pytest.param(QUALITY, False, id="quality-measured"),
    ],
)
def test_rank_scores_series_of_images(
    photos: list[str], quality: list[str] | None, given: bool
) -> None:
    ranker = build("lora", quality, rank=4)
    perturb(ranker)
    table = photo_table(photos)
    given_q = np.random.default_rng(3).uniform(0, 1, (len(table), len(QUALITY))) * [10, 1, 0.5]
    if given:
        table[QUALITY] = given_q

    out = ranker.rank(table)

    assert list(out.columns) == ["series_id", "image_uri", "score", "prob", "rank"]
    assert out["image_uri"].tolist() == photos
    assert out["series_id"].tolist() == table["series_id"].tolist()
    prep = ImagePreparation(SPEC)
    decoded = [prep.decode(Path(u).read_bytes(), source=u) for u in photos]
    pixels = prep.pixels(decoded)
    measured = prep.quality(decoded)[:, [FEATURE_NAMES.index(n) for n in QUALITY]]
    q = None if quality is None else given_q.astype(np.float32) if given else measured
    for sid in ("a", "b"):
        rows = np.flatnonzero(table["series_id"].to_numpy() == sid)
        s = out.iloc[rows]
        (want,) = ranker.score(pixels[rows], None if q is None else q[rows], [len(rows)])
        np.testing.assert_allclose(s["score"], want, rtol=0, atol=1e-5)
        assert sorted(s["rank"]) == list(range(1, len(rows) + 1))
        assert int(s["rank"].to_numpy()[np.argmax(want)]) == 1
        np.testing.assert_allclose(s["prob"].sum(), 1.0, atol=1e-9)
        np.testing.assert_allclose(s["prob"], np.exp(want) / np.exp(want).sum(), atol=1e-6)
    if quality is not None:  # the two quality sources score differently: which one was used shows
        (a,) = ranker.score(pixels, given_q.astype(np.float32), [5])
        (b,) = ranker.score(pixels, measured, [5])
        assert np.abs(a - b).max() > 1e-4


def test_rank_names_an_image_it_cannot_read(tmp_path: Path, photos: list[str]) -> None:
    ranker = build("lora", rank=2)
    gone = str(tmp_path / "gone.jpg")
    table = pd.DataFrame({"series_id": ["a", "a", "b"], "image_uri": [photos[0], gone, photos[1]]})
    with pytest.raises(DataError, match=re.escape(gone)):
        ranker.rank(table)
