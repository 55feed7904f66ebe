"""Images and texts to L2-normalised float32 embeddings.

``ClipEmbedder`` is a plain callable class: the constructor loads the model once, and
``__call__(batch) -> batch`` maps a dict of columns to the same dict with an ``embedding`` column.
Ray Data's ``map_batches`` (an actor pool), a Serve replica and a test all use it unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from keeper_core.errors import DataError, ModelLoadError
from keeper_core.models import LoadedClip, ModelSpec, load_clip, resize_transform

#: Input columns ``__call__`` understands, in order of preference.
PIXELS = "pixel_values"  # (N, 3, S, S): float (full transform) or uint8 (resize/crop only)
IMAGES = "image"  # decoded RGB images: PIL images or (H, W, 3) uint8 arrays


def l2_normalize(x: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation to float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def check_same_spec(*specs: str | ModelSpec) -> str:
    """Return the one spec shared by every argument; mixing two specs' embeddings is an error."""
    canon = {str(ModelSpec.parse(s)) for s in specs}
    if len(canon) != 1:
        raise DataError(f"embeddings of different model specs cannot be mixed: {sorted(canon)}")
    return canon.pop()


class ClipEmbedder:
    """Embeds images and texts with one CLIP model.

    Args:
        spec: a ModelSpec string such as ``keeper-tiny:random`` or ``ViT-B-32:laion2b_s34b_b79k``.
        device: torch device; CUDA when present by default (with bf16/fp16 autocast).
        batch_size: images per forward pass when given more (bounds peak memory).
        text_cache_size: prompt embeddings kept in memory (prompt sets repeat across requests).
        cache_dir: where S3/hub weights are cached.
    """

    def __init__(
        self,
        spec: str | ModelSpec,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        text_cache_size: int = 4096,
        cache_dir: str | Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.clip: LoadedClip = load_clip(spec, device, cache_dir=cache_dir)
        self.spec = str(self.clip.spec)
        self.batch_size = batch_size
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._resize = resize_transform(self.clip.spec)
        self._mean = torch.tensor(self.clip.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.clip.std).view(1, 3, 1, 1)

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature ``exp(model.logit_scale)`` (100 for OpenAI/LAION ViT-B-32).

        Raises:
            ModelLoadError: the model has none (not a contrastive CLIP).
        """
        scale = getattr(self.clip.model, "logit_scale", None)
        if not isinstance(scale, torch.Tensor):
            raise ModelLoadError(self.spec, "the model has no logit_scale (not a CLIP model?)")
        return float(scale.detach().float().exp().cpu())

    @property
    def logit_bias(self) -> float | None:
        """A SigLIP-style model's learned bias (``logits = scale * cos + bias``); None for CLIP."""
        bias = getattr(self.clip.model, "logit_bias", None)
        return float(bias.detach().float().cpu()) if isinstance(bias, torch.Tensor) else None

    @property
    def is_random(self) -> bool:
        """True when the weights are random: scores from this model mean nothing."""
        return self.clip.spec.is_random

    def preprocess(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One RGB image -> the model's input tensor (3, S, S) float32, as numpy."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
        return self.clip.transform(image).numpy()

    def preprocess_uint8(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One RGB image -> resized, cropped uint8 (3, S, S); normalisation happens on device."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
        return self._resize(image)

    @torch.inference_mode()
    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Model inputs (N, 3, S, S) -> embeddings (N, D), unit-norm float32.

        Takes either normalised float pixels (the spec's full transform) or uint8 pixels (its
        resize/crop only), which are scaled and normalised here, on the model's device.
        """
        if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:
            pixels = pixels.copy()  # Ray hands out read-only views; torch wants writable memory
        x = torch.as_tensor(pixels)
        s = self.clip.image_size
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (s, s):
            raise DataError(f"pixel_values must be (N, 3, {s}, {s}), got {tuple(x.shape)}")
        out = np.empty((x.shape[0], self.embed_dim), dtype=np.float32)
        model: Any = self.clip.model
        dev = self.clip.device
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i : i + self.batch_size].to(dev, non_blocking=True)
            if chunk.dtype == torch.uint8:
                chunk = (chunk.float() / 255.0 - self._mean.to(dev)) / self._std.to(dev)
            with self.clip.autocast():
                emb = model.encode_image(chunk.float())
            out[i : i + len(chunk)] = emb.float().cpu().numpy()
        return l2_normalize(out)

    def embed_images(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """Decoded RGB images -> embeddings (N, D)."""
        if len(images) == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.embed_pixels(np.stack([self.preprocess(im) for im in images]))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> embeddings (N, D); repeated texts come from an LRU cache."""
        if isinstance(texts, str):
            raise DataError("embed_texts takes a sequence of strings, not one string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise DataError(f"texts must be non-empty strings; bad positions {bad}", rows=bad)
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        model: Any = self.clip.model
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i : i + self.batch_size]
            tokens = self.clip.tokenizer(chunk).to(self.clip.device)
            with self.clip.autocast():
                emb = l2_normalize(model.encode_text(tokens).float().cpu().numpy())
            for t, e in zip(chunk, emb, strict=True):
                self._text_cache[t] = e
        for t in texts:
            self._text_cache.move_to_end(t)
        result = np.stack([self._text_cache[t] for t in texts]) if texts else None
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        if result is None:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return result

    def prompt_embeddings(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """A prompt set as {text: embedding}, the form the scoring functions take."""
        return dict(zip(prompts, self.embed_texts(list(prompts)), strict=True))

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Adds ``embedding`` (N, D) and ``model_spec`` columns to a batch of images.

        Reads ``pixel_values`` if present (the fast path: a CPU stage already preprocessed),
        else ``image``. The input image column is dropped from the output.
        """
        out = dict(batch)
        if PIXELS in out:
            pixels = out.pop(PIXELS)
            # A tensor stays one: decode=gpu's pixels are already on the model's device, and a
            # CUDA tensor cannot become a NumPy array (nor should it travel to the host and back).
            if not isinstance(pixels, torch.Tensor):
                pixels = np.asarray(pixels)
            emb = self.embed_pixels(pixels)
        elif IMAGES in out:
            emb = self.embed_images(list(out.pop(IMAGES)))
        else:
            raise DataError(f"batch has neither {PIXELS!r} nor {IMAGES!r}: {sorted(batch)}")
        out["embedding"] = emb
        out["model_spec"] = np.array([self.spec] * len(emb), dtype=object)
        return out
