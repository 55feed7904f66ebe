"""``VlmJudge``: a vision-language model judging (image, query) pairs, batched across requests.

One replica holds one ``keeper_core.vlm.VlmJudge`` (the code ``keeper select`` runs too): the
relevance of an image to a query is VQAScore's ``P(yes) / (P(yes) + P(no))`` from next-token
logits. The ingress sends only the candidates that survived the cascade's cheap stages, as
uint8 RGB arrays already downscaled to ``vlm.max_image_side``. ``keeper_serve.batcher``'s
continuous batching merges the pairs of concurrent requests (different queries may share a forward
pass) into batches of up to ``max_batch_size``, formed when the model frees up, as the encoder's
are; the forward runs on a worker thread so the replica keeps accepting calls meanwhile. An image
the model gives no finite answer for scores NaN, and only it: the other requests that shared its
batch get their scores (the ingress reports the NaN as that candidate's ``vlm_failed``). A call
the judge would refuse (its query empty, too long or holding a special token, by the judge's own
``QueryRules``; an image that is not HxWx3 uint8) fails alone, before it joins a batch: it never
fails the other requests' calls. ``info()`` carries those rules (``max_query_chars``,
``reserved_tokens``), so the ingress refuses such a query (422) before it runs the cascade.

It is its own deployment so that a burst of ``/v1/select`` scales VLM replicas (their own
autoscaling, their own ``num_gpus``, fractional where a GPU is shared) without scaling the CLIP
encoder. The app deploys it only when ``vlm.source`` is set (``keeper_serve.app``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray import serve

from keeper_core.errors import ConfigError, DataError
from keeper_core.torch_thread import TorchThread, pin_torch_threads
from keeper_core.vlm import VlmConfig, load_vlm
from keeper_core.vlm import VlmJudge as CoreJudge
from keeper_serve.batcher import ContinuousBatcher
from keeper_serve.config import VLM_INFO_KEYS, VlmArgs
from keeper_serve.encoder import torch_threads

log = logging.getLogger("keeper.serve")


# Defaults for `vlm.source=...` given with no VlmJudge block in the Serve config (the shipped CPU
# config has none): small enough to fit a 2-core box beside the others; a block overrides them.
@serve.deployment(
    ray_actor_options={"num_cpus": 0.2},
    max_ongoing_requests=8,
    max_queued_requests=32,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 10,
        "downscale_delay_s": 300,
    },
    logging_config={"enable_access_log": False},
)
class VlmJudge:
    def __init__(self, args: VlmArgs) -> None:
        if args.source is None:  # keeper_serve.app binds it only with a source
            raise ConfigError("VlmJudge needs vlm.source: without one the app deploys no VLM")
        self.args = args
        self.batcher = ContinuousBatcher(
            self._judge, args.max_batch_size, args.batch_wait_timeout_s
        )
        # Load and every forward on one thread (keeper_core.torch_thread: faster CPU forwards).
        self.torch_thread = TorchThread("vlm")
        # A model that cannot load fails the replica (Serve reports it); never other weights.
        self.judge = self.torch_thread.call(self._load, args)
        log.info("VlmJudge ready: %s", self.judge.describe())

    @staticmethod
    def _load(args: VlmArgs) -> CoreJudge:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            pin_torch_threads(torch_threads(args.torch_threads))
        assert args.source is not None  # __init__ checked
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
        """What judges: ``status`` "ready", ``VLM_INFO_KEYS`` (the keys a disabled VLM has) and
        the queries it refuses (``max_query_chars``, ``reserved_tokens``: its ``QueryRules``)."""
        d = self.judge.describe()
        return {
            "status": "ready",
            **{k: d[k] for k in VLM_INFO_KEYS},
            **self.judge.query_rules.as_dict(),
        }

    async def relevance(self, images: list[np.ndarray], query: str) -> np.ndarray:
        """(H, W, 3) uint8 images and one query -> float32 (N,) relevance in [0, 1].

        NaN: the model gave no finite answer for this image (non-finite logits); per item, so
        it never fails the others of the batch.

        Raises:
            DataError: a query the judge refuses, or an image that is not HxWx3 uint8; checked
                here, before the call joins a batch, so it fails this call alone.
        """
        why = self.judge.query_rules.problem(query)
        if why is not None:
            raise DataError(f"vlm query: {why}")
        items = [(_pil(im, i), query) for i, im in enumerate(images)]
        scores = await self.batcher.submit(items) if items else []
        return np.asarray(scores, dtype=np.float32)

    async def rationale(self, image: np.ndarray, query: str) -> str:
        """A short explanation of one judgement (bounded greedy generation), only when asked."""
        return await self.torch_thread.run(self.judge.rationale, _pil(image, 0), query)

    async def _judge(self, items: list[tuple[Image.Image, str]]) -> list[float]:
        # Every item was checked as its call came in (relevance): a refusal here would fail the
        # other calls of the batch.
        images = [im for im, _ in items]
        queries = [q for _, q in items]
        out = await self.torch_thread.run(self.judge.relevance, images, queries)
        return [float(x) for x in out]  # NaN stays NaN: that item's answer, not the batch's


def _pil(image: np.ndarray, index: int) -> Image.Image:
    """An (H, W, 3) uint8 view as the judge takes it.

    Raises:
        DataError: not such an array (naming its index in the call).
    """
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        raise DataError(f"image {index}: a view of {a.dtype} {a.shape}, not HxWx3 uint8")
    return Image.fromarray(np.ascontiguousarray(a), "RGB")
