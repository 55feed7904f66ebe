"""CLIP model specs and the one loader every stage uses.

A ModelSpec is ``ARCH[:WEIGHTS]``:

- ``ViT-B-32:laion2b_s34b_b79k``: an open_clip pretrained tag (open_clip fetches it from its hub).
- ``ViT-B-32:/path/w.safetensors`` (or ``.pt``/``.bin``/``.pth``): a local checkpoint file.
- ``ViT-B-32:s3://bucket/w.safetensors``: downloaded with boto3 into a cache keyed by ETag.
- ``keeper-tiny:random``: random weights (tests and the offline demo). Random init is seeded, so
  every process that loads the same ``ARCH:random`` spec gets the same model: embeddings from two
  Ray workers are comparable.

A spec that cannot load raises ModelLoadError naming the spec and the cause; there is no fallback.
Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors, never with pickle.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from keeper_core.errors import ModelLoadError

if TYPE_CHECKING:  # imported where used: a CPU decode worker needs no torch (~0.7 GiB, ~2.5 s)
    import torch

WeightsKind = Literal["random", "tag", "file", "s3"]
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: Fixed seed for ``ARCH:random`` so random models are identical across processes.
RANDOM_INIT_SEED = 0

_register_lock = threading.Lock()
_registered = False


def register_keeper_configs() -> None:
    """Register keeper's own open_clip model configs (``keeper-tiny``) once per process."""
    global _registered
    with _register_lock:
        if _registered:
            return
        import open_clip

        configs = resources.files("keeper_core") / "model_configs"
        with resources.as_file(configs) as path:
            open_clip.add_model_config(Path(path))
        _registered = True


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``ARCH[:WEIGHTS]`` string. ``str(spec)`` gives the canonical form back."""

    arch: str
    weights: str = "random"

    @classmethod
    def parse(cls, spec: str | ModelSpec) -> ModelSpec:
        """Parse ``ARCH[:WEIGHTS]``; WEIGHTS defaults to ``random``.

        Raises:
            ModelLoadError: empty arch or weights.
        """
        if isinstance(spec, ModelSpec):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ModelLoadError(str(spec), "a model spec is a non-empty string ARCH[:WEIGHTS]")
        arch, sep, weights = spec.strip().partition(":")
        if not arch or (sep and not weights):
            raise ModelLoadError(spec, "expected ARCH[:WEIGHTS], e.g. ViT-B-32:laion2b_s34b_b79k")
        return cls(arch=arch, weights=weights or "random")

    def __str__(self) -> str:
        return f"{self.arch}:{self.weights}"

    @property
    def weights_kind(self) -> WeightsKind:
        """How WEIGHTS is resolved: random init, a hub tag, a local file, or an S3 object."""
        if self.weights == "random":
            return "random"
        if self.weights.startswith("s3://"):
            return "s3"
        if self.weights.endswith(CHECKPOINT_SUFFIXES) or "/" in self.weights:
            return "file"
        return "tag"

    @property
    def is_random(self) -> bool:
        """True for random weights: every score made with them is meaningless."""
        return self.weights_kind == "random"


def _model_config(spec: ModelSpec) -> dict[str, Any]:
    import open_clip

    register_keeper_configs()
    cfg = open_clip.get_model_config(spec.arch)
    if cfg is None:
        known = ", ".join(open_clip.list_models()[:8])
        raise ModelLoadError(str(spec), f"unknown architecture {spec.arch!r} (e.g. {known}, ...)")
    return dict(cfg)


def _tag_config(spec: ModelSpec) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.weights)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        raise ModelLoadError(
            str(spec),
            f"{spec.weights!r} is neither a checkpoint path nor a pretrained tag of {spec.arch} "
            f"(known tags: {', '.join(tags) or 'none'})",
        )
    return dict(cfg)


def embed_dim(spec: str | ModelSpec) -> int:
    """The embedding width of a spec, from its config alone (no weights are loaded)."""
    return int(_model_config(ModelSpec.parse(spec))["embed_dim"])


class _NoRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


#: A model actor's process before its weights: Ray, torch, the model's library, a batch in flight.
ACTOR_BASELINE_BYTES = 1024**3


def actor_memory_request(weight_bytes: int) -> int:
    """Bytes a model actor asks Ray for: its baseline and its weights, plus the 25 % headroom
    Ray Data's memory check wants over what a worker was seen to use (``keeper embed``'s CLIP
    actors, ``keeper select``'s VLM actors)."""
    return math.ceil(1.25 * (ACTOR_BASELINE_BYTES + weight_bytes))


def parameter_count(spec: str | ModelSpec) -> int:
    """Parameters and buffers (elements) of a spec's model, from its config alone.

    The model is built on torch's meta device: no memory, no weights, ~0.1-0.4 s even for
    ViT-H-14. What a model actor's memory request is sized from (``keeper embed``).

    Raises:
        ModelLoadError: an unknown architecture.
    """
    import open_clip
    import torch

    s = ModelSpec.parse(spec)
    _model_config(s)  # an unknown arch: ModelLoadError naming it
    quiet = _NoRandomInitWarning()  # no weights are meant to be loaded here
    logging.getLogger().addFilter(quiet)
    try:
        with torch.device("meta"):
            model = open_clip.create_model(s.arch, device="meta", pretrained_text=False)
    finally:
        logging.getLogger().removeFilter(quiet)
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


@dataclass(frozen=True)
class PreprocessConfig:
    """What the image transform of a spec needs; known without loading any weights."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def preprocess_config(spec: str | ModelSpec, *, from_tags: bool = True) -> PreprocessConfig:
    """The preprocessing a spec expects (size, normalisation), from configs only (no weights).

    This lets a CPU-only decode stage prepare model inputs without ever loading the model.

    A hub tag carries its own (SigLIP's mean and std 0.5 and squash resize, ...). Weights from a
    file, an S3 object or random init take the architecture config's; where that names none
    (open_clip keeps it with the tags for SigLIP, SigLIP 2, MobileCLIP, PE-Core, CLIPA and the
    DFN ViT-H-14-378 configs), the one every pretrained tag of the architecture agrees on: a
    checkpoint file of SigLIP's weights is prepared as ``ARCH:webli`` is. Where the tags differ
    (ViT-L-14, ViT-H-14: one tag each prepares otherwise) the config's default stands, and
    loading such a checkpoint warns (``load_clip``). ``from_tags=False``: as keeper did before
    2026-12-07 (the config's default alone), to recognise tables embedded then.
    """
    import open_clip

    s = ModelSpec.parse(spec)
    cfg = _model_config(s)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    pre: dict[str, Any] = dict(cfg.get("preprocess_cfg", {}))
    if s.weights_kind == "tag":
        tag = _tag_config(s)
        pre.update({k: tag[k] for k in _PREPROCESS_KEYS if k in tag})
    elif from_tags and not _names_preprocessing(cfg):
        ways = tags_preprocessing(s.arch)
        if len(ways) == 1:
            pre.update(ways[0][0])
    mean = tuple(pre.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pre.get("std") or open_clip.OPENAI_DATASET_STD)
    return PreprocessConfig(
        image_size=size,
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
        interpolation=str(pre.get("interpolation") or "bicubic"),
        resize_mode=str(pre.get("resize_mode") or "shortest"),
    )


@functools.lru_cache(maxsize=64)
def tags_preprocessing(arch: str) -> tuple[tuple[dict[str, Any], tuple[str, ...]], ...]:
    """The distinct ways the open_clip pretrained tags of ``arch`` prepare images: each setting
    of mean, std, interpolation and resize mode (as far as a tag names them), with the tags that
    use it. Empty for an architecture without tags (keeper-tiny). Treat the dicts as read-only."""
    import open_clip

    register_keeper_configs()
    ways: dict[tuple[tuple[str, Any], ...], list[str]] = {}
    for tag in open_clip.list_pretrained_tags_by_model(arch):
        cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        pre = {
            k: tuple(v) if isinstance(v := cfg[k], list) else v
            for k in _PREPROCESS_KEYS
            if k in cfg
        }
        ways.setdefault(tuple(sorted(pre.items())), []).append(tag)
    return tuple((dict(key), tuple(tags)) for key, tags in ways.items())


def _names_preprocessing(cfg: dict[str, Any]) -> bool:
    """Whether an architecture's config says how to prepare images (else its tags do)."""
    return any(k in cfg.get("preprocess_cfg", {}) for k in _PREPROCESS_KEYS)


def _warn_if_tags_differ(s: ModelSpec, cfg: dict[str, Any]) -> None:
    """A checkpoint of an architecture whose pretrained tags prepare images in more than one way
    is prepared as its config says: say so, naming the tags that differ (once per spec)."""
    ways = tags_preprocessing(s.arch)
    if _names_preprocessing(cfg) or len(ways) < 2 or str(s) in _warned_preprocessing:
        return
    _warned_preprocessing.add(str(s))
    used = preprocess_config(s)
    other = [
        tag
        for pre, tags in ways
        if any(getattr(used, k) != v for k, v in pre.items())
        for tag in tags
    ]
    logging.getLogger(__name__).warning(
        "%s: the checkpoint is prepared as %s's config says (mean %s, std %s, resize %s); "
        "the weights of %s were trained with other "
        "preprocessing: if it holds those, load that tag instead, or its embeddings are off",
        s,
        s.arch,
        used.mean,
        used.std,
        used.resize_mode,
        ", ".join(other),
    )


_warned_preprocessing: set[str] = set()


def spec_field(spec: str, *, look_up: bool = True) -> str:
    """A config's ModelSpec field, for its pydantic validator: the spec, canonical
    (``ViT-B-32`` is ``ViT-B-32:random``), and with ``look_up`` known to open_clip (its arch and
    tag are looked up in configs; no weights are loaded; open_clip is imported).

    Every config that names a model validates it with this (keeper embed's ``model``, pick's
    ``clip_model``, the Serve app's ``clip_model``, ...), so a typo fails the same way
    everywhere, before any work.

    Raises:
        ValueError: no ``ARCH[:WEIGHTS]``, or an unknown arch or tag (pydantic names the field
            for ValueErrors only).
    """
    try:
        if look_up:
            preprocess_config(spec)
        return str(ModelSpec.parse(spec))
    except ModelLoadError as e:
        raise ValueError(str(e)) from e


def image_transform(spec: str | ModelSpec) -> Callable[[Any], torch.Tensor]:
    """The eval transform (PIL RGB image -> float tensor (3, S, S)) of a spec, without weights."""
    import open_clip

    p = preprocess_config(spec)
    return open_clip.image_transform(
        p.image_size,
        is_train=False,
        mean=p.mean,
        std=p.std,
        interpolation=p.interpolation,
        resize_mode=p.resize_mode,
    )


def resize_transform(spec: str | ModelSpec | PreprocessConfig) -> Callable[[Any], np.ndarray]:
    """The geometric half of the eval transform: PIL RGB image -> uint8 array (3, S, S).

    Resize and crop run on CPU workers; scaling to [0, 1] and normalising happen on the model's
    device (``ClipEmbedder.embed_pixels`` accepts uint8). Shipping uint8 instead of float32 moves
    4x fewer bytes between a decode stage and a GPU actor, and the result equals the full transform
    (ToTensor divides uint8 by 255 the same way).

    Pillow only: the same ``Image.resize`` and crop calls torchvision makes on a PIL image for
    open_clip's eval transform (``image_transform``), with the same sizes, offsets and padding,
    so the pixels are identical (tests/unit/core/test_resize_transform.py). Given a
    ``PreprocessConfig`` (computed once where open_clip is imported), a CPU decode worker runs it
    without importing torch, torchvision or open_clip.
    """
    p = spec if isinstance(spec, PreprocessConfig) else preprocess_config(spec)
    if p.resize_mode not in ("shortest", "longest", "squash"):
        raise ModelLoadError(str(spec), f"unknown resize_mode {p.resize_mode!r}")
    size = p.image_size
    # open_clip: "bilinear" is bilinear, anything else ("bicubic", "random") bicubic
    resample = (
        Image.Resampling.BILINEAR if p.interpolation == "bilinear" else Image.Resampling.BICUBIC
    )

    def apply(image: Any) -> np.ndarray:
        w, h = image.size
        if p.resize_mode == "squash":
            new_w, new_h = size, size
        elif p.resize_mode == "longest":  # open_clip's ResizeKeepRatio(longest=1)
            ratio = max(h / size, w / size)
            new_w, new_h = round(w / ratio), round(h / ratio)
        else:  # torchvision's Resize(size): the short side to size, the long one truncated
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size, int(size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample)
        if p.resize_mode != "squash":
            image = _center_crop_or_pad(image, size)
        return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy()

    return apply


def _center_crop_or_pad(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``center_crop`` (open_clip's ``center_crop_or_pad``): pad a side shorter
    than ``size`` with zeros, split as torchvision splits it, then crop the centre."""
    w, h = image.size
    if size > w or size > h:
        left = (size - w) // 2 if size > w else 0
        top = (size - h) // 2 if size > h else 0
        padded = Image.new(
            image.mode, (max(w, size), max(h, size)), 0
        )  # right/bottom get the odd pixel
        padded.paste(image, (left, top))
        image, (w, h) = padded, padded.size
        if (w, h) == (size, size):
            return image
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a device: bf16 (or fp16) on CUDA, none (fp32) on CPU."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass
class LoadedClip:
    """A CLIP model ready for inference, with what is needed to feed it."""

    spec: ModelSpec
    model: torch.nn.Module
    transform: Callable[[Any], torch.Tensor]
    device: torch.device
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @functools.cached_property
    def tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        """open_clip's tokenizer for the arch, made on first use: work on images alone (``keeper
        embed``, fine-tuning the tower, ranking) never needs it, and some must be fetched (SigLIP's
        from the Hugging Face hub), which an air-gapped cluster cannot do.

        Raises:
            ModelLoadError: it cannot be made (named, with the cause).
        """
        return load_tokenizer(self.spec)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision on CUDA, a no-op on CPU."""
        import torch

        dtype = autocast_dtype(self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def load_tokenizer(spec: str | ModelSpec) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for ``spec``'s arch.

    Raises:
        ModelLoadError: it cannot be made: a Hugging Face tokenizer (``hf_tokenizer_name``) not
            in the local cache and no hub to fetch it from, or a bad name.
    """
    import open_clip

    s = ModelSpec.parse(spec)
    register_keeper_configs()
    try:
        tokenizer: Callable[[list[str]], torch.Tensor] = open_clip.get_tokenizer(s.arch)
    except Exception as e:  # transformers/fsspec raise OSError, ValueError, HTTP errors, ...
        hf = (open_clip.get_model_config(s.arch) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
        where = (
            f" (the Hugging Face tokenizer {hf!r}: put it in the hub cache, HF_HOME)" if hf else ""
        )
        raise ModelLoadError(
            str(s),
            f"its tokenizer cannot be loaded{where}: {type(e).__name__}: {e}; only text prompts "
            "need it, image embeddings do not",
        ) from e
    return tokenizer


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    import torch

    # fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def weights_version(spec: str | ModelSpec) -> str | None:
    """What a spec's weights are, beyond their name: ``sha256:<hex>`` of a local checkpoint's
    bytes, ``etag:<tag>`` of an S3 one; None for random init and open_clip's pretrained tags
    (named versions) and for a local file this process cannot see.

    A spec names its weights by path, so a checkpoint replaced at the same path keeps the same
    spec: this is what tells the two apart (an embedding table records it beside the spec).

    Raises:
        ModelLoadError: the S3 object cannot be reached.
    """
    from keeper_core import storage
    from keeper_core.errors import StorageError

    s = ModelSpec.parse(spec)
    if s.weights_kind == "s3":
        try:
            return f"etag:{storage.object_info(s.weights).etag}"
        except StorageError as e:
            raise ModelLoadError(str(s), f"cannot read checkpoint: {e}") from e
    if s.weights_kind != "file":
        return None
    path = Path(s.weights.removeprefix("file://")).expanduser()
    if not path.is_file():
        return None  # read where the model loads (another node's path): it fails there if missing
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


#: The record an embedding table keeps of its spec and weights (``keeper embed`` writes it).
TABLE_META = "_KEEPER_TABLE.json"


def check_weights(spec: str, recorded: str | None, where: str, *, now: str | None = None) -> None:
    """Refuse embeddings made with a checkpoint since replaced at the same path.

    ``recorded`` is the :func:`weights_version` the embeddings were made with (None: not
    recorded, nothing to check); ``now`` what the spec's checkpoint holds now (computed when not
    given; None when it cannot be seen here).

    Raises:
        DataError: the two differ, naming both.
    """
    from keeper_core.errors import DataError

    if not recorded:
        return
    now = now if now is not None else weights_version(spec)
    if now and now != recorded:
        raise DataError(
            f"{where} holds embeddings of {spec!r} made with weights {recorded}; that checkpoint "
            f"now holds {now}: it was replaced. Embeddings of two checkpoints never mix: "
            "re-embed into another output (or give the new checkpoint its own path)."
        )


def preprocess_record(spec: str, *, from_tags: bool = True) -> dict[str, Any]:
    """How ``spec`` prepares images (:func:`preprocess_config`), as a table's JSON record keeps
    it."""
    import dataclasses
    import json

    record: dict[str, Any] = json.loads(
        json.dumps(dataclasses.asdict(preprocess_config(spec, from_tags=from_tags)))
    )
    return record


def check_table_preprocessing(spec: str, recorded: Any, where: str) -> None:
    """Refuse embeddings of images prepared otherwise than ``spec`` prepares them now: as the
    table's record says (``recorded``), or for a record without it (a table from before
    2026-12-07), as keeper prepared ``spec`` then (a checkpoint file of SigLIP and ~50 other
    architectures was prepared with CLIP's mean and std, not as their pretrained weights are).

    Raises:
        DataError: they differ, both named.
    """
    from keeper_core.errors import DataError

    now = preprocess_record(spec)
    then = recorded if isinstance(recorded, dict) else preprocess_record(spec, from_tags=False)
    if then == now:
        return
    when = (
        ""
        if isinstance(recorded, dict)
        else " (it was embedded before keeper prepared this architecture's checkpoints as its "
        "pretrained weights are)"
    )
    raise DataError(
        f"{where} holds embeddings of {spec!r} of images prepared as {then}{when}; this run "
        f"prepares them as {now}. Rows prepared two ways never mix: re-embed into another output."
    )


def check_table(spec: str, table_uri: str) -> None:
    """Refuse a table's embeddings for ``spec`` where its record (``keeper embed`` writes one)
    says they were made with a checkpoint since replaced at the spec's path, or from images
    prepared otherwise than ``spec`` prepares them now. A table without a record is not checked.

    Raises:
        DataError: either, named. ModelLoadError: the spec's S3 checkpoint cannot be reached.
    """
    import json

    from keeper_core import storage

    meta_uri = storage.join(table_uri, TABLE_META)
    if not storage.exists(meta_uri):
        return
    try:
        meta = json.loads(storage.read_bytes(meta_uri))
    except ValueError:
        return  # keeper embed refuses such a record itself, naming it
    if not isinstance(meta, dict):
        return
    check_weights(spec, meta.get("weights_version"), table_uri)
    check_table_preprocessing(spec, meta.get("preprocess"), table_uri)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime in the key: a rewritten file is hashed again (~1 s a GB).
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _resolve_checkpoint(spec: ModelSpec, cache_dir: str | Path | None) -> str:
    from keeper_core import storage
    from keeper_core.errors import StorageError

    if spec.weights_kind == "s3":
        try:
            return str(storage.download_cached(spec.weights, cache_dir=cache_dir))
        except StorageError as e:
            raise ModelLoadError(str(spec), f"cannot fetch checkpoint: {e}") from e
    path = Path(spec.weights.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ModelLoadError(str(spec), f"checkpoint file not found: {path}")
    return str(path)


def load_clip(
    spec: str | ModelSpec,
    device: str | torch.device | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> LoadedClip:
    """Load a CLIP model for inference.

    Args:
        spec: ``ARCH[:WEIGHTS]`` (see the module docstring).
        device: ``cuda``/``cpu``/a torch device; default CUDA when present.
        cache_dir: where S3 checkpoints and hub downloads are cached.

    Returns:
        The model in eval mode on ``device``, its eval transform and (made on first use) its
        tokenizer.

    Raises:
        ModelLoadError: unknown arch or tag, missing or unreadable file, shape mismatch,
            unreachable S3 object, a hub tag that cannot be fetched. Never falls back.
    """
    import open_clip
    import torch

    s = ModelSpec.parse(spec)
    dev = torch.device(device) if device is not None else default_device()
    cfg = _model_config(s)
    kind = s.weights_kind
    try:
        if kind == "tag":
            _tag_config(s)  # a clear error for unknown tags before any download is tried
            model = open_clip.create_model(
                s.arch,
                pretrained=s.weights,
                device=dev,
                cache_dir=str(cache_dir) if cache_dir else None,
                weights_only=True,
            )
        else:
            with _seeded(RANDOM_INIT_SEED):
                # pretrained_text=False: never let a config pull base tower weights from a hub.
                model = open_clip.create_model(s.arch, device="cpu", pretrained_text=False)
            if kind in ("file", "s3"):
                path = _resolve_checkpoint(s, cache_dir)
                open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
                _warn_if_tags_differ(s, cfg)
            model = model.to(dev)
    except ModelLoadError:
        raise
    except Exception as e:  # open_clip raises RuntimeError/OSError/pickle errors, all fatal here
        raise ModelLoadError(str(s), f"{type(e).__name__}: {e}") from e
    model.eval()
    pre = preprocess_config(s)
    return LoadedClip(
        spec=s,
        model=model,
        transform=image_transform(s),
        device=dev,
        embed_dim=int(cfg["embed_dim"]),
        image_size=pre.image_size,
        mean=pre.mean,
        std=pre.std,
    )


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Save a model's state dict as safetensors (or ``.pt`` by suffix), for loading by spec."""
    import torch

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(p))
    else:
        torch.save(state, p)
    return p
