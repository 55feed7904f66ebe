"""``ClipEncoder``: images and texts to embeddings, with dynamic batching across requests.

One replica holds one CLIP model (keeper_core's ClipEmbedder, the same code ``keeper embed``
runs). Requests bring already resized uint8 pixels (the ingress decodes), so a replica's
CPU or GPU time goes to the model. Concurrent calls are merged into forward passes of up to
``max_batch_size`` images (counted in images, not requests) by ``keeper_serve.batcher``'s
continuous batching: the next batch is formed from every call waiting at the moment the
previous forward ends, so a loaded replica runs full batches, and a call that finds the model
idle runs at once (a lone client never pays ``batch_wait_timeout_s``, which only lets a batch
formed under load wait to fill). The model is loaded, warmed up and run on one thread of its own
(``keeper_core.torch_thread``: a model loaded on one thread and run on others ran a batch-1
forward 1.6x as long on 2 cores), so the replica keeps accepting calls meanwhile; forwards never
overlap. ``user_config``
``{"max_batch_size": N, "batch_wait_timeout_s": T}`` retunes batching in place.

Why not ``@serve.batch``: it cuts a batch ``batch_wait_timeout_s`` after its first call whether
or not the model is busy, and queues the cut batches behind the running one, so under load it
ran batches of ~3 images while calls waited seconds (docs/benchmarks.md, "Online serving").
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from ray import serve

from keeper_core.embedding import ClipEmbedder
from keeper_core.torch_thread import TorchThread, pin_torch_threads
from keeper_serve.batcher import ContinuousBatcher
from keeper_serve.config import EncoderArgs

log = logging.getLogger("keeper.serve")


def _images(items: list[np.ndarray]) -> int:
    return sum(len(x) for x in items)


def torch_threads(requested: int | None) -> int:
    """Intra-op threads: as asked, else what Ray granted the replica (OMP_NUM_THREADS)."""
    if requested:
        return requested
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1))


@serve.deployment
class ClipEncoder:
    def __init__(self, clip_model: str, encoder: EncoderArgs) -> None:
        self.torch_thread = TorchThread("clip")  # every torch call of this replica runs here
        self.embedder = self.torch_thread.call(self._load, clip_model, encoder)
        self.max_batch_size = encoder.max_batch_size
        self.batcher = ContinuousBatcher(
            self._forward, encoder.max_batch_size, encoder.batch_wait_timeout_s
        )
        log.info(
            "ClipEncoder ready: %s on %s, %d torch threads, batch <= %d",
            self.embedder.spec,
            self.embedder.clip.device,
            self.torch_thread.call(torch.get_num_threads),  # as the forwards' thread sees it
            self.max_batch_size,
        )

    @staticmethod
    def _load(clip_model: str, encoder: EncoderArgs) -> ClipEmbedder:
        if not torch.cuda.is_available() or encoder.device == "cpu":
            pin_torch_threads(torch_threads(encoder.torch_threads))
        embedder = ClipEmbedder(
            clip_model,
            device=encoder.device,
            batch_size=encoder.max_batch_size,
            text_cache_size=encoder.text_cache_size,
            cache_dir=encoder.cache_dir,
        )
        # Warm-up: the first forward pays for allocator and kernel selection, not a client.
        s = embedder.clip.image_size
        embedder.embed_pixels(np.zeros((1, 3, s, s), np.uint8))
        # The text routes need the tokenizer, made on first use: one that cannot load (a Hugging
        # Face tokenizer not in the cache) fails the replica now, not a client's request later.
        _ = embedder.clip.tokenizer
        return embedder

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"max_batch_size": int, "batch_wait_timeout_s": float}``, both optional."""
        n = self.batcher.apply_user_config("ClipEncoder", user_config)
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
            "logit_bias": self.embedder.logit_bias,
        }

    async def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) uint8 -> (N, D) float32; N may exceed a batch (split, then batched)."""
        if len(pixels) == 0:
            return np.zeros((0, self.embedder.embed_dim), np.float32)
        return await self.batcher.submit(pixels)

    async def _forward(self, pixels: np.ndarray) -> np.ndarray:
        out: np.ndarray = await self.torch_thread.run(self.embedder.embed_pixels, pixels)
        return out

    def batching_stats(self) -> dict[str, float]:
        """This replica's image calls (a call larger than a batch counts once per chunk), those
        that found the model idle and ran at once, forwards, images, and the seconds its forwards
        took (normalising and the model, on the replica's torch thread)."""
        return self.batcher.stats.as_dict()

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (N, D); repeats (prompt sets) come from the embedder's LRU cache."""
        # The cache is a plain OrderedDict: safe, as only the torch thread touches it.
        return await self.torch_thread.run(self.embedder.embed_texts, texts)
