"""``ClipEncoder``: images and texts to embeddings, with dynamic batching across requests.

One replica holds one CLIP model (keeper_core's ClipEmbedder, the same code ``keeper embed``
runs). Requests bring already resized uint8 pixels (the ingress decodes), so a replica's
CPU or GPU time goes to the model. ``@serve.batch`` merges concurrent requests into forward
passes of up to ``max_batch_size`` images (counted in images, not requests); the forward runs
on a worker thread so the replica keeps queueing the next batch meanwhile. ``user_config``
``{"max_batch_size": N, "batch_wait_timeout_s": T}`` retunes batching in place.

An idle replica does not wait to fill a batch: a call that finds no other call in the replica
(running or queued) runs at once, since nothing it could wait for is here. Calls that arrive
while the model is busy queue in ``@serve.batch`` and fill the next batch as before. So a lone
client (concurrency 1) no longer pays ``batch_wait_timeout_s`` on every request, and a loaded
replica batches exactly as it did. Forwards never overlap: one model, one forward at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Protocol, cast

import numpy as np
import torch
from ray import serve

from keeper_core.embedding import ClipEmbedder
from keeper_serve.config import EncoderArgs

log = logging.getLogger("keeper.serve")


def _images(items: list[np.ndarray]) -> int:
    return sum(len(x) for x in items)


def torch_threads(requested: int | None) -> int:
    """Intra-op threads: as asked, else what Ray granted the replica (OMP_NUM_THREADS)."""
    if requested:
        return requested
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1))


class _BatchTuning(Protocol):
    """The setters ``@serve.batch`` attaches to the method it wraps (its stubs omit them)."""

    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None: ...


def batch_tuning(method: object) -> _BatchTuning:
    """A ``@serve.batch`` method's batch-size and wait setters, typed."""
    return cast(_BatchTuning, method)


def apply_batch_config(name: str, method: object, user_config: dict[str, Any]) -> int | None:
    """A deployment's batching ``user_config`` applied to its ``@serve.batch`` method.

    Returns:
        The new ``max_batch_size``, or None when it was not given.

    Raises:
        ValueError: an unknown key or a batch size below 1 (Serve keeps the old config).
    """
    unknown = set(user_config) - {"max_batch_size", "batch_wait_timeout_s"}
    if unknown:
        raise ValueError(f"{name} user_config: unknown keys {sorted(unknown)}")
    n = None
    if "max_batch_size" in user_config:
        n = int(user_config["max_batch_size"])
        if n < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {n}")
        batch_tuning(method).set_max_batch_size(n)
    if "batch_wait_timeout_s" in user_config:
        batch_tuning(method).set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
    return n


@serve.deployment
class ClipEncoder:
    def __init__(self, clip_model: str, encoder: EncoderArgs) -> None:
        if not torch.cuda.is_available() or encoder.device == "cpu":
            torch.set_num_threads(torch_threads(encoder.torch_threads))
        self.embedder = ClipEmbedder(
            clip_model,
            device=encoder.device,
            batch_size=encoder.max_batch_size,
            text_cache_size=encoder.text_cache_size,
            cache_dir=encoder.cache_dir,
        )
        self.max_batch_size = encoder.max_batch_size
        batching = batch_tuning(self._embed_batch)
        batching.set_max_batch_size(encoder.max_batch_size)
        batching.set_batch_wait_timeout_s(encoder.batch_wait_timeout_s)
        self._text_lock = asyncio.Lock()
        self._model_lock = asyncio.Lock()  # one forward at a time (idle fast path and batches)
        self._calls = 0  # embed_pixels calls in this replica: running or waiting
        self._stats = {"calls": 0, "unbatched_calls": 0, "forwards": 0, "images": 0}
        # Warm-up: the first forward pays for allocator and kernel selection, not a client.
        s = self.embedder.clip.image_size
        self.embedder.embed_pixels(np.zeros((1, 3, s, s), np.uint8))
        log.info(
            "ClipEncoder ready: %s on %s, %d torch threads, batch <= %d",
            self.embedder.spec,
            self.embedder.clip.device,
            torch.get_num_threads(),
            self.max_batch_size,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"max_batch_size": int, "batch_wait_timeout_s": float}``, both optional."""
        n = apply_batch_config("ClipEncoder", self._embed_batch, user_config)
        if n is not None:
            self.max_batch_size = n
            self.embedder.batch_size = n

    def info(self) -> dict[str, Any]:
        return {
            "spec": self.embedder.spec,
            "embed_dim": self.embedder.embed_dim,
            "image_size": self.embedder.clip.image_size,
            "random_weights": self.embedder.is_random,
            "logit_scale": self.embedder.logit_scale,
        }

    async def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) uint8 -> (N, D) float32; N may exceed a batch (split, then batched)."""
        if len(pixels) == 0:
            return np.zeros((0, self.embedder.embed_dim), np.float32)
        n = self.max_batch_size
        idle = self._calls == 0
        self._calls += 1
        self._stats["calls"] += 1
        try:
            if idle and len(pixels) <= n:  # nobody here to batch with: no wait to fill one
                self._stats["unbatched_calls"] += 1
                return await self._forward(pixels)
            parts = await asyncio.gather(
                *(self._embed_batch(pixels[i : i + n]) for i in range(0, len(pixels), n))
            )
            return np.concatenate(parts)
        finally:
            self._calls -= 1

    async def _forward(self, pixels: np.ndarray) -> np.ndarray:
        async with self._model_lock:
            out: np.ndarray = await asyncio.to_thread(self.embedder.embed_pixels, pixels)
        self._stats["forwards"] += 1
        self._stats["images"] += len(pixels)
        return out

    def batching_stats(self) -> dict[str, int]:
        """This replica's image calls, those that skipped the batch wait, forwards and images."""
        return dict(self._stats)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_images)
    async def _embed_batch(self, items: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(x) for x in items]
        emb = await self._forward(np.concatenate(items))
        return np.split(emb, np.cumsum(sizes)[:-1])

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D); repeats (prompt sets) come from the embedder's LRU cache."""
        async with self._text_lock:  # the cache is a plain OrderedDict
            return await asyncio.to_thread(self.embedder.embed_texts, texts)
