"""A fine-tuned series ranker: its own CLIP vision tower (base spec + what trained) and a head.

Where a ``SeriesRanker`` scores rows of an embedding table, a ``TunedRanker`` embeds pixels with
its adapted tower first, so it needs images, not a table's embeddings. Saved as plain artifacts
in one folder, loaded without pickle and without keeper_train:

| file | holds |
| --- | --- |
| ``ranker.json`` | ``RankerConfig`` with ``tower`` (``keeper_core.tower.TowerConfig``) |
| ``weights.safetensors`` | the head |
| ``adapter.safetensors`` | LoRA tensors (peft's key names); empty for ``last-blocks`` |
| ``blocks.safetensors`` | the blocks trained in full (the base tower's names); empty for ``lora`` |

The frozen backbone is never copied: it is loaded from ``tower.base_spec`` (a hub tag, a file, an
``s3://`` object), so the artifact of a LoRA fine-tune of ViT-B-32 is a few MB. A file or object
can be replaced under the same spec, so ``tower.base_weights`` records what it held (its sha256 or
ETag) and the adapters load only onto those weights.

``embedding_spec`` names the tuned tower (``BASE+METHOD#SHA``), so embeddings of any other model,
the base included, are refused where they would be mixed with its own. ``merged_state_dict``
folds the adapters into a full open_clip checkpoint, loadable as ``ARCH:PATH`` (``keeper export``).

    ranker = TunedRanker.load("ranker/")
    ranked = ranker.rank(rows)          # series_id, image_uri (+ quality columns) -> rank 1 = keeper
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from keeper_core.errors import DataError, KeeperError, ModelLoadError
from keeper_core.heads import make_head
from keeper_core.models import ModelSpec, load_clip, weights_version
from keeper_core.ranker import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    RankerConfig,
    inverse_std,
    read_config,
    unreadable_errors,
)
from keeper_core.tower import (
    TowerConfig,
    TrainableParts,
    TunedTower,
    apply_tuning,
    load_tower_state,
    merged_visual_state,
    snapshot,
    tower_state,
)

ADAPTER_FILE, BLOCKS_FILE = "adapter.safetensors", "blocks.safetensors"

log = logging.getLogger(__name__)


class TunedRankerModel(nn.Module):
    """Tower + head: flat pixels of a batch of series -> a score per image.

    ``forward(pixels (N, 3, S, S), mask (B, L), quality (N, Q) | None) -> (B, L)`` where the N
    images are the True positions of ``mask`` in row-major order (series laid end to end).
    Quality features arrive raw and are standardised here with the train statistics.
    """

    q_mean: torch.Tensor
    q_scale: torch.Tensor

    def __init__(self, tower: TunedTower, head: nn.Module, config: RankerConfig) -> None:
        super().__init__()
        self.tower = tower
        self.head = head
        self.uses_quality = config.features == "embedding+quality"
        q = len(config.quality_names) if self.uses_quality else 0
        mean = torch.tensor(config.quality_mean or [0.0] * q, dtype=torch.float32)
        scale = torch.tensor(inverse_std(config.quality_std or [1.0] * q), dtype=torch.float32)
        self.register_buffer("q_mean", mean, persistent=False)
        self.register_buffer("q_scale", scale, persistent=False)

    def score_embeddings(
        self, emb: torch.Tensor, mask: torch.Tensor, quality: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The head over the tower's embeddings (N, D) (+ standardised quality) -> (B, L)."""
        feats = emb
        if self.uses_quality:
            if quality is None:
                raise DataError("this ranker uses quality features and none were given")
            feats = torch.cat([emb, (quality.float() - self.q_mean) * self.q_scale], dim=1)
        if int(mask.sum()) != len(feats):
            raise DataError(f"mask holds {int(mask.sum())} images, pixels {len(feats)}")
        x = feats.new_zeros((*mask.shape, feats.shape[1]))
        x[mask] = feats
        return self.head(x, mask)

    def forward(
        self, pixels: torch.Tensor, mask: torch.Tensor, quality: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.score_embeddings(self.tower(pixels), mask, quality)


def tower_id(
    config: RankerConfig, adapter: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor]
) -> str:
    """``BASE+METHOD#SHA``: names the tuned tower's weights (its embeddings' spec), the base
    weights' version included where it is recorded."""
    assert config.tower is not None
    h = hashlib.sha256(config.tower.model_dump_json(exclude=_unrecorded(config.tower)).encode())
    for part in (adapter, blocks):
        for k in sorted(part):
            h.update(k.encode())
            h.update(part[k].float().numpy().tobytes())
    return f"{config.tower.base_spec}+{config.tower.method}#{h.hexdigest()[:12]}"


def _unrecorded(tower: TowerConfig) -> set[str]:
    # No base_weights recorded: the JSON of a tower config saved before the field existed, so its
    # tower_id stays what it was and an older keeper still reads the ranker.json.
    return {"base_weights"} if tower.base_weights is None else set()


def check_base_weights(tower: TowerConfig) -> TowerConfig:
    """Refuse a base checkpoint that no longer holds the weights the tower was tuned on; pin
    them where nothing is recorded yet.

    Adapters and unfrozen blocks are deltas against those weights: on others (a checkpoint
    re-exported to the same path, an S3 object overwritten) they still load, and every embedding
    is silently off.

    Returns:
        ``tower``, with ``base_weights`` set to the checkpoint's version now where it had none
        (a file or S3 base; random init and hub tags have no version to pin).

    Raises:
        ModelLoadError: the versions differ, naming the spec and both; the S3 object cannot be
            reached.
    """
    now = weights_version(tower.base_spec)
    if now is None:  # random, a hub tag, or no file here (load_clip names it)
        return tower
    if tower.base_weights is None:
        return tower.model_copy(update={"base_weights": now})
    if now != tower.base_weights:
        raise ModelLoadError(
            tower.base_spec,
            f"the tuned tower was made on base weights {tower.base_weights}, and the checkpoint "
            f"now holds {now}: it was replaced since (re-exported or overwritten). Put those "
            "weights back at that path, or fine-tune again on the new ones",
        )
    return tower


class TunedRanker:
    """A fine-tuned ranker in eval mode on one device.

    Build one for training with ``TunedRanker.build`` (base weights loaded, tuning applied, a
    fresh head), or load a saved one with ``TunedRanker.load``.
    """

    def __init__(
        self, config: RankerConfig, model: TunedRankerModel, parts: TrainableParts,
        device: torch.device, image_size: int,
    ) -> None:  # fmt: skip
        if config.tower is None:
            raise DataError("a TunedRanker needs a RankerConfig with a tower")
        self.config = config
        self.model = model
        self.parts = parts
        self.device = device
        self.image_size = image_size
        self.model.eval()

    @property
    def base_spec(self) -> str:
        assert self.config.tower is not None
        return self.config.tower.base_spec

    @classmethod
    def build(
        cls, config: RankerConfig, *, device: str | torch.device | None = None,
        cache_dir: str | Path | None = None, seed: int = 0,
    ) -> TunedRanker:  # fmt: skip
        """The base tower loaded, tuning applied (targets checked), a freshly seeded head.

        The base checkpoint's version is checked against ``tower.base_weights``, or recorded
        there when the config has none (``check_base_weights``): what is saved names the weights
        it was tuned on.

        Raises:
            ConfigError: a LoRA target or block count the tower does not have.
            ModelLoadError: the base spec cannot load, or holds other weights than
                ``tower.base_weights`` records.
        """
        if config.tower is None:
            raise DataError("a TunedRanker needs a RankerConfig with a tower")
        # Before the load: a checkpoint replaced meanwhile is refused later, never pinned unseen.
        config = config.model_copy(update={"tower": check_base_weights(config.tower)})
        assert config.tower is not None
        clip = load_clip(config.tower.base_spec, "cpu", cache_dir=cache_dir)
        visual = clip.model.visual
        assert isinstance(visual, nn.Module)
        # Seeded before the adapters too (LoRA's A matrices are drawn from torch's generator):
        # a build depends on its seed alone, not on what the process drew before.
        torch.manual_seed(seed)
        parts = apply_tuning(visual, config.tower)
        head = make_head(config.head)
        model = TunedRankerModel(TunedTower(visual, clip.mean, clip.std), head, config)
        dev = torch.device(device) if device is not None else clip.device
        return cls(config, model.to(dev), parts, dev, clip.image_size)

    # ------------------------------------------------------------------ artifacts

    def trained_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """``adapter``, ``blocks`` (see ``keeper_core.tower.tower_state``) and ``head`` tensors:
        CPU copies, a snapshot that later training does not change."""
        state = tower_state(self.model.tower.visual, self.parts)
        state["head"] = snapshot(self.model.head.state_dict())
        return state

    def load_trained_state(self, state: dict[str, dict[str, torch.Tensor]], *, source: str) -> None:
        """Put ``trained_state`` tensors back (strict: every tensor present and of its shape)."""
        load_tower_state(
            self.model.tower.visual, self.parts, state["adapter"], state["blocks"], source=source
        )
        try:
            self.model.head.load_state_dict(state["head"])
        except RuntimeError as e:
            raise ModelLoadError(source, f"head weights do not fit: {e}") from e

    def save(self, folder: str | Path) -> Path:
        """Write the four files; ``embedding_spec`` is set to the tuned tower's id."""
        from safetensors.torch import save_file

        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        state = self.trained_state()
        self.config = self.config.model_copy(
            update={"embedding_spec": tower_id(self.config, state["adapter"], state["blocks"])}
        )
        assert self.config.tower is not None
        exclude = {"tower": _unrecorded(self.config.tower)}
        (d / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2, exclude=exclude))
        save_file(state["head"], str(d / WEIGHTS_FILE))
        save_file(state["adapter"], str(d / ADAPTER_FILE))
        save_file(state["blocks"], str(d / BLOCKS_FILE))
        return d

    @classmethod
    def load(
        cls, folder: str | Path, *, device: str | torch.device | None = None,
        cache_dir: str | Path | None = None,
    ) -> TunedRanker:  # fmt: skip
        """Load a saved fine-tuned ranker: base tower by its spec, then the saved tensors.

        Raises:
            DataError: missing files, an invalid config, or a corrupt ``.safetensors`` file
                (named).
            ModelLoadError: the base cannot load, holds other weights than the ranker was
                tuned on, or the tensors do not fit it.
        """
        from safetensors.torch import load_file

        d = Path(folder)
        try:
            config = read_config(d)
        except unreadable_errors() as e:
            raise DataError(f"cannot load fine-tuned ranker: {e}", source=str(d)) from e
        state = {}
        for key, name in (
            ("head", WEIGHTS_FILE),
            ("adapter", ADAPTER_FILE),
            ("blocks", BLOCKS_FILE),
        ):
            try:
                state[key] = load_file(str(d / name))
            except unreadable_errors() as e:
                raise DataError(f"cannot load fine-tuned ranker: {e}", source=str(d / name)) from e
        if config.tower is None:
            raise DataError("not a fine-tuned ranker (ranker.json has no tower)", source=str(d))
        base = ModelSpec.parse(config.tower.base_spec)
        if config.tower.base_weights is None and base.weights_kind in ("file", "s3"):
            log.info(
                "%s: ranker.json records no version of its base %s (saved before keeper "
                "recorded one): the base weights are not checked",
                d, base,
            )  # fmt: skip
        ranker = cls.build(config, device=device, cache_dir=cache_dir)
        ranker.config = config  # as saved: an older one stays without the version build pins
        ranker.load_trained_state(state, source=str(d))
        got = tower_id(config, state["adapter"], state["blocks"])
        if config.embedding_spec != got:
            raise ModelLoadError(
                str(d), f"the saved tensors are not the ones ranker.json names ({got})"
            )
        ranker.model.eval()
        return ranker

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """A full open_clip state dict of the base model with the tuned tower merged in."""
        assert self.config.tower is not None
        if self.config.tower.base_weights is not None:  # read again here: it may have changed
            check_base_weights(self.config.tower)
        clip = load_clip(self.base_spec, "cpu")
        state = {k: v.detach().contiguous() for k, v in clip.model.state_dict().items()}
        visual = merged_visual_state(self.model.tower.visual)
        unknown = sorted(k for k in visual if f"visual.{k}" not in state)
        if unknown:
            raise ModelLoadError(
                self.base_spec, f"merged tensors {unknown[:4]} are not in the base"
            )
        state.update({f"visual.{k}": v.cpu() for k, v in visual.items()})
        return state

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def embed_pixels(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, 3, S, S) uint8 -> (N, D) unit-norm float32 from the tuned tower."""
        self._check(pixels)
        out = [
            self.model.tower(torch.as_tensor(np.array(pixels[i : i + batch_size])).to(self.device))
            .float()
            .cpu()
            .numpy()
            for i in range(0, len(pixels), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _check(self, pixels: np.ndarray) -> None:
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s) or pixels.dtype != np.uint8:
            raise DataError(
                f"pixels must be (N, 3, {s}, {s}) uint8, got {pixels.shape} {pixels.dtype}"
            )

    @torch.inference_mode()
    def score(
        self, pixels: np.ndarray, quality: np.ndarray | None, lengths: Sequence[int],
        batch_series: int = 32,
    ) -> list[np.ndarray]:  # fmt: skip
        """Series laid end to end (``lengths``) -> raw scores, one array per series."""
        self._check(pixels)
        if sum(lengths) != len(pixels) or (quality is not None and len(quality) != len(pixels)):
            raise DataError(f"lengths add up to {sum(lengths)}, pixels hold {len(pixels)}")
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
        out: list[np.ndarray] = []
        for i in range(0, len(lengths), batch_series):
            ls = list(lengths[i : i + batch_series])
            a, b = starts[i], starts[i + len(ls)]
            mask = torch.zeros((len(ls), max(ls)), dtype=torch.bool)
            for j, n in enumerate(ls):
                mask[j, :n] = True
            q = None if quality is None else torch.as_tensor(np.array(quality[a:b]))
            s = self.model(
                torch.as_tensor(np.array(pixels[a:b])).to(self.device),
                mask.to(self.device),
                None if q is None else q.to(self.device),
            )
            s = s.float().cpu().numpy()
            out += [s[j, :n] for j, n in enumerate(ls)]
        return out

    def rank(self, table: pd.DataFrame) -> pd.DataFrame:
        """Rows with ``series_id``, ``image_uri`` (local or ``s3://``) and, when the ranker uses
        them, the quality columns (else measured here) -> ``series_id, image_uri, score, prob,
        rank`` in input order. Images are prepared as ``keeper embed`` prepares them.

        Raises:
            DataError: a missing column, or an image that cannot be read or decoded (named).
        """
        from keeper_core import storage
        from keeper_core.preparation import ImagePreparation
        from keeper_core.quality import FEATURE_NAMES
        from keeper_core.ranker import ranked_frame, series_arrays

        for col in ("series_id", "image_uri"):
            if col not in table.columns:
                raise DataError(f"a fine-tuned ranker needs column {col!r}")
        prep = ImagePreparation(self.base_spec)
        decoded = []
        for uri in table["image_uri"].astype(str):
            try:
                decoded.append(prep.decode(storage.read_bytes(uri), source=uri))
            except KeeperError as e:
                raise DataError(f"cannot prepare {uri}: {e}", source=uri) from e
        pixels = prep.pixels(decoded)
        names = self.config.quality_names
        quality = None
        if self.config.features == "embedding+quality":
            if all(c in table.columns for c in names):
                quality = table[names].to_numpy(dtype=np.float32)
            else:
                full = prep.quality(decoded)
                quality = full[:, [FEATURE_NAMES.index(n) for n in names]]
        _, _, rows = series_arrays(table, np.zeros((len(table), 0), np.float32))
        order = np.concatenate(rows)
        scores = self.score(
            pixels[order], None if quality is None else quality[order], [len(r) for r in rows]
        )
        return ranked_frame(table, rows, scores)


def augment_series(
    pixels: torch.Tensor, rng: np.random.Generator, *, max_shift: int, flip: bool
) -> torch.Tensor:
    """One random flip and shift, the same for every shot of a series: (L, 3, S, S) uint8.

    Only geometry changes: the shift moves the frame by whole pixels (reflected at the border)
    and the flip mirrors it, so no resampling touches the sharpness, exposure or noise that tell
    the keeper from the rest, and the shots of a burst stay aligned with each other.
    """
    out = pixels
    if flip and rng.random() < 0.5:
        out = out.flip(-1)
    if max_shift > 0:
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        if dy or dx:
            s = out.shape[-1]
            m = max_shift
            padded = torch.nn.functional.pad(out.float(), (m, m, m, m), mode="reflect")
            out = padded[..., m + dy : m + dy + s, m + dx : m + dx + s].round().to(pixels.dtype)
    return out
