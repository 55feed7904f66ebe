"""``VlmJudge``: a vision-language model judging (image, query) pairs, batched across requests.

One replica holds one ``keeper_core.vlm.VlmJudge`` (the code ``keeper select`` runs too): the
relevance of an image to a query is VQAScore's ``P(yes) / (P(yes) + P(no))`` from next-token
logits. The ingress sends only the candidates that survived the cascade's cheap stages, as
uint8 RGB arrays already downscaled to ``vlm.max_image_side``. ``keeper_serve.batcher``'s
continuous batching merges the pairs of concurrent requests (different queries may share a forward
pass) into batches of up to ``max_batch_size``, formed when the model frees up, as the encoder's
are; the forward runs on a worker thread so the replica keeps accepting calls meanwhile.

It is its own deployment so that a burst of ``/v1/select`` scales VLM replicas (their own
autoscaling, their own ``num_gpus``, fractional where a GPU is shared) without scaling the CLIP
encoder. With ``vlm.source: null`` the replica holds no model and ``info()`` says "disabled".
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray import serve

from keeper_core.torch_thread import TorchThread
from keeper_core.vlm import VlmConfig, load_vlm
from keeper_core.vlm import VlmJudge as CoreJudge
from keeper_serve.batcher import ContinuousBatcher
from keeper_serve.config import VlmArgs
from keeper_serve.encoder import torch_threads

log = logging.getLogger("keeper.serve")

#: What ``info()`` reports of a loaded judge (keeper_core.vlm.VlmJudge.describe() has more).
INFO_KEYS = (
    "source",
    "architecture",
    "dtype",
    "device",
    "parameters",
    "random_weights",
    "relevance_template",
)


@serve.deployment
class VlmJudge:
    def __init__(self, args: VlmArgs) -> None:
        self.args = args
        self.judge: CoreJudge | None = None
        self.batcher = ContinuousBatcher(
            self._judge, args.max_batch_size, args.batch_wait_timeout_s
        )
        if args.source is None:
            log.info("VlmJudge: no vlm.source configured; /v1/select runs without a VLM stage")
            return
        # Load and every forward on one thread (keeper_core.torch_thread: faster CPU forwards).
        self.torch_thread = TorchThread("vlm")
        # A model that cannot load fails the replica (Serve reports it); never other weights.
        self.judge = self.torch_thread.call(self._load, args)
        log.info("VlmJudge ready: %s", self.judge.describe())

    @staticmethod
    def _load(args: VlmArgs) -> CoreJudge:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            torch.set_num_threads(torch_threads(args.torch_threads))
        assert args.source is not None  # __init__ returned before
        return load_vlm(
            VlmConfig(
                source=args.source, device=device, dtype=args.dtype, max_batch=args.max_batch_size
            ),
            cache_dir=args.cache_dir,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"max_batch_size": int, "batch_wait_timeout_s": float}``, both optional."""
        self.batcher.apply_user_config("VlmJudge", user_config)

    def info(self) -> dict[str, Any]:
        """What judges: always the same keys; ``status`` "ready" or "disabled" (all else null)."""
        if self.judge is None:
            return {"status": "disabled", **dict.fromkeys(INFO_KEYS)}
        d = self.judge.describe()
        return {"status": "ready", **{k: d[k] for k in INFO_KEYS}}

    async def relevance(self, images: list[np.ndarray], query: str) -> np.ndarray:
        """(H, W, 3) uint8 images and one query -> float32 (N,) relevance in [0, 1].

        Raises:
            RuntimeError: no VLM is configured (the ingress checks ``info`` first).
        """
        if self.judge is None:
            raise RuntimeError("no VLM is configured (vlm.source is null)")
        scores = await self.batcher.submit([(im, query) for im in images]) if images else []
        return np.asarray(scores, dtype=np.float32)

    async def rationale(self, image: np.ndarray, query: str) -> str:
        """A short explanation of one judgement (bounded greedy generation), only when asked.

        Raises:
            RuntimeError: no VLM is configured.
        """
        if self.judge is None:
            raise RuntimeError("no VLM is configured (vlm.source is null)")
        im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
        return await self.torch_thread.run(self.judge.rationale, im, query)

    async def _judge(self, items: list[tuple[np.ndarray, str]]) -> list[float]:
        assert self.judge is not None  # relevance() checked
        judge = self.judge
        images = [
            Image.fromarray(np.ascontiguousarray(im, dtype=np.uint8), "RGB") for im, _ in items
        ]
        queries = [q for _, q in items]
        out = await self.torch_thread.run(judge.relevance, images, queries)
        return [float(x) for x in out]
