"""The VLM judge: relevance and quality from a vision-language model's next-token probabilities.

It runs only on the few candidates that survive the cheap stages of the selection cascade (one
judgement costs ~640 ViT-B-32 embeddings), and the batch jobs and the Serve replicas call these
same functions. Scores come from the logits of the token the model would emit right after the
prompt, never from parsing generated text:

- relevance, as VQAScore does (Lin et al., ECCV 2024): the prompt is
  ``Does this figure show "{query}"? Please answer yes or no.`` and the score is
  ``P(yes) / (P(yes) + P(no))``, in [0, 1].
- quality, as Q-Align does (Wu et al., ICML 2024): the assistant turn is started with "The quality
  of the image is", the logits of the five level words (excellent, good, fair, poor, bad) are
  softmaxed among themselves and dotted with (1, .75, .5, .25, 0).

Which token is "yes"? The judge asks the tokenizer. For each answer word ``w`` it tries the
continuations ``" w"``, ``"w"``, ``" W"``, ``"W"`` (``W`` capitalised) after the prompt exactly as
the model sees it; a continuation counts when ``prompt + continuation`` encodes as the prompt's own
tokens plus exactly one non-special token that decodes back to the word. ``P(w)`` is the sum of
the probabilities of the distinct tokens found this way (a Llava-1.5 model answers "Yes" as often
as "yes"). A word with no such token, or a token claimed by two words, is a load error: the judge
never scores with a token that is not the word.

What a judge accepts as a query is ``keeper_core.cascade.QueryRules`` (``VlmJudge.query_rules``, in
``describe()``; ``query_rules(config)`` reads them from the checkpoint's processor files alone, no
weights): not empty, at most ``max_query_chars``, and no special token of the tokenizer (a query
holding ``<image>`` would add image slots the pixels cannot fill, ``</s>`` would end the prompt
early). Callers that batch the queries of several requests or queries check each with them first,
so one refused query never fails the others.

An image more than ``MAX_ASPECT`` times as long as it is wide (or the other way) is centre-cropped
to that ratio before the processor sees it (``bound_aspect``): a 16 x 100,000 PNG of 14 kB would
otherwise be resized by its shortest edge into gigabytes of pixels.

An image whose logits are not all finite (a float16 overflow on one odd image, a NaN from its
vision features) scores NaN, and only it: one such image must not fail the others of its batch,
which in Serve are other requests' images. The callers turn the NaN into that image's failure.

Typical use::

    judge = load_vlm(VlmConfig(source="s3://models/llava-1.5-7b-hf", device="cuda"))
    rel = judge.relevance(images, "a dog on a beach")   # float32 (N,) in [0, 1], or NaN
    q = judge.quality(images)                           # float32 (N,) in [0, 1], or NaN
    judge.describe()                                    # what to name in a response

transformers is imported inside the functions (``pip install 'keeper-core[vlm]'``), so this module
imports without it. Tests and the offline demo use ``keeper_core.tiny_vlm.build_tiny_vlm``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_core import storage
from keeper_core.cascade import QueryRules
from keeper_core.errors import DataError, ModelLoadError, StorageError
from keeper_core.models import actor_memory_request

#: What to install when transformers is missing.
INSTALL_HINT = "pip install 'keeper-core[vlm]'"
#: Written by keeper_core.tiny_vlm beside the checkpoint; ``random_weights`` is read from it.
KEEPER_JSON = "keeper.json"
#: A hub id: ``name`` or ``org/name`` (letters, digits, ``._-``).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_QUERY = "{query}"
#: Renders the prompts once at load to find the answer tokens; any query gives the same tail.
_PROBE_QUERY = "a photo"
#: The most an image's long side may exceed its short side (4:1) when the VLM sees it; wider ones
#: are centre-cropped to it (``bound_aspect``). The processors resize by the shortest edge, so a
#: 16 x 100,000 image became 336 x 2,100,000 pixels (~3 GB, 11 s) before Llava-1.5's crop. 4:1
#: takes nothing Llava-1.5 sees (it keeps the centre square of what it resized) and keeps every
#: tile layout LLaVA-NeXT chooses from (its grids reach 3:1); it bounds the resized image to
#: 336 x 1,344 there. Real panoramas (32:9 is 3.6:1) pass whole.
MAX_ASPECT = 4.0
#: Weight files: what ``query_rules`` does not download from an ``s3://`` checkpoint.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
)

SourceKind = Literal["local", "s3", "hub"]

log = logging.getLogger(__name__)


class VlmConfig(BaseModel):
    """Which VLM to load and how it judges.

    Attributes:
        source: a local checkpoint folder, an ``s3://bucket/prefix`` holding one (downloaded into
            a local cache), or a Hugging Face hub id such as ``llava-hf/llava-1.5-7b-hf``.
        device: ``cpu`` or ``cuda``.
        dtype: ``auto`` (bfloat16 on cuda where supported, float32 on cpu), ``float32`` or
            ``bfloat16`` (cuda only: bf16 matmuls on CPU are slow and not what was validated).
        max_batch: images per forward pass; larger inputs run in chunks of this size.
        relevance_template: the relevance question; ``{query}`` is replaced by the query.
        yes_word / no_word: the answers whose probabilities make the relevance score.
        quality_prompt: the quality question (Q-Align).
        quality_answer_prefix: the assistant's answer is started with this; the level word is
            the next token.
        level_words / level_weights: Q-Align's levels, best first, and the score of each.
        rationale_template: the question ``rationale`` asks; ``{query}`` is replaced.
        max_rationale_tokens: the cap on tokens a rationale may generate.
        max_query_chars: the longest query accepted (longer is a DataError, never truncated).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    source: str = Field(min_length=1)
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_batch: int = Field(default=8, ge=1)
    relevance_template: str = 'Does this figure show "{query}"? Please answer yes or no.'
    yes_word: str = "yes"
    no_word: str = "no"
    quality_prompt: str = "Can you evaluate the quality of the image?"
    quality_answer_prefix: str = "The quality of the image is"
    level_words: tuple[str, ...] = ("excellent", "good", "fair", "poor", "bad")
    level_weights: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25, 0.0)
    rationale_template: str = (
        'Does this figure show "{query}"? Answer yes or no, then say why in one sentence.'
    )
    max_rationale_tokens: int = Field(default=64, ge=1, le=1024)
    max_query_chars: int = Field(default=512, ge=1, le=8192)

    @model_validator(mode="after")
    def _check(self) -> VlmConfig:
        if not self.source.strip():
            raise ValueError("source: empty")
        for name in ("relevance_template", "rationale_template"):
            if getattr(self, name).count(_QUERY) != 1:
                raise ValueError(f"{name}: must contain {_QUERY} exactly once")
        if not self.quality_prompt.strip():
            raise ValueError("quality_prompt: empty")
        words = [self.yes_word, self.no_word, *self.level_words]
        for w in words:
            if not w or w != w.strip() or any(c.isspace() for c in w):
                raise ValueError(f"answer word {w!r}: must be one word without spaces")
        if self.yes_word.lower() == self.no_word.lower():
            raise ValueError("yes_word and no_word must differ")
        if len({w.lower() for w in self.level_words}) != len(self.level_words):
            raise ValueError(f"level_words: repeated word in {self.level_words}")
        if len(self.level_words) < 2 or len(self.level_words) != len(self.level_weights):
            raise ValueError(
                f"level_words ({len(self.level_words)}) and level_weights "
                f"({len(self.level_weights)}) must have the same length, at least 2"
            )
        if any(not 0.0 <= w <= 1.0 for w in self.level_weights):
            raise ValueError(f"level_weights: each must be in [0, 1], got {self.level_weights}")
        if self.device == "cpu" and self.dtype == "bfloat16":
            raise ValueError("dtype bfloat16 runs on cuda only; use auto or float32 on cpu")
        return self


def reserved_tokens(processor: Any) -> tuple[str, ...]:
    """The strings a query must not hold: the tokenizer's special tokens and the image token."""
    tok = processor.tokenizer
    image = getattr(processor, "image_token", None)
    found = {str(t) for t in tok.all_special_tokens if t} | ({str(image)} if image else set())
    return tuple(sorted(found))


def bound_aspect(image: Any, max_aspect: float = MAX_ASPECT) -> Any:
    """``image`` centre-cropped to at most ``max_aspect`` : 1 (long side to short side); an
    image within it is returned as it is. Why 4:1: ``MAX_ASPECT``."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    if long <= short * max_aspect:
        return image
    keep = max(1, int(short * max_aspect))
    start = (long - keep) // 2
    box = (start, 0, start + keep, h) if w > h else (0, start, w, start + keep)
    return image.crop(box)


def _local_path(source: str) -> Path:
    """The folder a ``local`` source names (``file://`` and ``~`` resolved)."""
    return Path(source.strip().removeprefix("file://")).expanduser()


def source_kind(source: str) -> SourceKind:
    """How ``source`` is resolved: an ``s3://`` prefix, a local folder, or a hub id.

    A source is local when it starts with ``/``, ``./``, ``../``, ``~`` or ``file://``, names
    something that exists on disk, or is ``dir/name`` where ``dir`` is a local folder (a relative
    path with a typo, ``checkpoints/lava``, is then a missing folder, not a hub model of that
    name quietly downloaded instead); otherwise it is a hub id when it looks like ``org/name``.

    Raises:
        ModelLoadError: it is none of these.
    """
    s = source.strip()
    if storage.is_s3(s):
        return "s3"
    if s.startswith(("/", "./", "../", "~", "file://")) or Path(s).exists():
        return "local"
    if "/" in s and Path(s).parent.is_dir():
        return "local"
    if _HUB_ID.match(s) and ".." not in s:
        return "hub"
    raise ModelLoadError(source, "neither a local folder, an s3:// prefix, nor a hub id org/name")


class VlmJudge:
    """A loaded VLM that scores images; made by :func:`load_vlm`.

    Thread safety: one lock serialises every call (``relevance``, ``quality``, ``rationale``), so
    a judge may be shared by threads, but calls never run in parallel: the fast tokenizer's
    padding state is not safe to mutate concurrently, and one forward already uses every core or
    the whole GPU. A Serve replica should gather concurrent requests into one call
    (keeper_serve's batcher) rather than rely on concurrency.

    Attributes:
        config: what was asked for.
        model: the transformers model, in eval mode on ``device``.
        processor: its processor (tokenizer, image processor, chat template).
        local_dir: the folder the weights were read from (None for a hub id: HF's cache has it).
        random_weights: True when the checkpoint says so (``keeper.json``): scores mean nothing.
        answer_token_ids: for each answer word, the token ids whose probabilities are summed.
    """

    def __init__(
        self,
        *,
        config: VlmConfig,
        model: Any,
        processor: Any,
        local_dir: Path | None,
        random_weights: bool,
        answer_token_ids: dict[str, tuple[int, ...]],
    ) -> None:
        self.config = config
        self.model = model
        self.processor = processor
        self.local_dir = local_dir
        self.random_weights = random_weights
        self.answer_token_ids = answer_token_ids
        self.device: torch.device = next(model.parameters()).device
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self._lock = threading.Lock()
        self._relevance_groups = (
            answer_token_ids[config.yes_word],
            answer_token_ids[config.no_word],
        )
        self._level_groups = tuple(answer_token_ids[w] for w in config.level_words)
        self._weights = torch.tensor(config.level_weights, dtype=torch.float32)
        # A query holding "<image>" would add image slots the pixels cannot fill; "</s>" would
        # end the prompt early. Both are refused rather than scored.
        self.query_rules = QueryRules(config.max_query_chars, reserved_tokens(processor))

    # ----------------------------------------------------------------------------- prompts

    def relevance_prompt(self, query: str) -> str:
        """The full text (chat template applied) whose next token is read for ``query``."""
        return render_prompt(self.processor, self.config.relevance_template.replace(_QUERY, query))

    def quality_prompt(self) -> str:
        """The full text (chat template applied, answer started) whose next token is a level."""
        return render_prompt(
            self.processor, self.config.quality_prompt, self.config.quality_answer_prefix
        )

    # ----------------------------------------------------------------------------- scores

    def relevance(self, images: Sequence[Any], queries: Sequence[str] | str) -> np.ndarray:
        """VQAScore: ``P(yes) / (P(yes) + P(no))`` for each image and its query.

        Args:
            images: PIL images (decoded by keeper_core's safe loader; any mode the processor
                converts to RGB).
            queries: one query for all images, or one per image.

        Returns:
            float32 array (N,) in [0, 1]; NaN: the model gave no finite answer for this image
            (non-finite logits, logged at warning), the others are scored as without it.

        Raises:
            DataError: no images, a non-image, an empty or too long query (``max_query_chars``),
                a query holding a special token (``<image>``), or a different number of queries
                than images.
        """
        imgs = _check_images(images)
        qs = self._check_queries(queries, len(imgs))
        prompts = [self.relevance_prompt(q) for q in qs]
        lse = self._answer_logsumexp(imgs, prompts, self._relevance_groups)
        # P(yes)/(P(yes)+P(no)) = sigmoid(logsumexp(yes) - logsumexp(no)): the softmax's
        # normaliser cancels, and this form cannot overflow.
        scores = torch.sigmoid(lse[:, 0] - lse[:, 1])
        return _as_scores(scores)

    def quality(self, images: Sequence[Any]) -> np.ndarray:
        """Q-Align: softmax over the level words' logits, dotted with the level weights.

        Args:
            images: PIL images.

        Returns:
            float32 array (N,) in [0, 1]; NaN: the model gave no finite answer for this image
            (non-finite logits, logged at warning), the others are scored as without it.

        Raises:
            DataError: no images, or a non-image.
        """
        imgs = _check_images(images)
        prompt = self.quality_prompt()
        lse = self._answer_logsumexp(imgs, [prompt] * len(imgs), self._level_groups)
        return _as_scores(torch.softmax(lse, dim=-1) @ self._weights)

    def rationale(self, image: Any, query: str, max_new_tokens: int | None = None) -> str:
        """A short greedy explanation for one image and query; only when a caller asks.

        Args:
            image: a PIL image.
            query: what the image should show.
            max_new_tokens: tokens to generate at most; default and cap ``max_rationale_tokens``.

        Returns:
            The generated text (special tokens dropped, stripped).

        Raises:
            DataError: a non-image, a bad query, or ``max_new_tokens`` outside 1..cap.
        """
        (img,) = _check_images([image])
        (q,) = self._check_queries(query, 1)
        cap = self.config.max_rationale_tokens
        n = cap if max_new_tokens is None else max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= cap:
            raise DataError(f"max_new_tokens must be an integer in 1..{cap}, got {n!r}")
        prompt = render_prompt(self.processor, self.config.rationale_template.replace(_QUERY, q))
        with self._lock, torch.inference_mode():
            inputs = self._inputs([img], [prompt])
            out = self.model.generate(
                **inputs,
                max_new_tokens=n,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        return str(self.processor.tokenizer.decode(new, skip_special_tokens=True)).strip()

    def describe(self) -> dict[str, Any]:
        """What produced the scores, for responses and run records to name."""
        cfg = self.model.config
        tok = self.processor.tokenizer
        archs = getattr(cfg, "architectures", None) or [type(self.model).__name__]
        return {
            "source": self.config.source,
            "local_dir": str(self.local_dir) if self.local_dir is not None else None,
            "architecture": str(archs[0]),
            "model_type": str(getattr(cfg, "model_type", "")),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "parameters": int(sum(p.numel() for p in self.model.parameters())),
            "random_weights": self.random_weights,
            "relevance_template": self.config.relevance_template,
            "quality_prompt": self.config.quality_prompt,
            "quality_answer_prefix": self.config.quality_answer_prefix,
            "level_words": list(self.config.level_words),
            "level_weights": list(self.config.level_weights),
            "max_batch": self.config.max_batch,
            "answer_tokens": {
                w: tok.convert_ids_to_tokens(list(ids)) for w, ids in self.answer_token_ids.items()
            },
            **self.query_rules.as_dict(),
        }

    # ----------------------------------------------------------------------------- internals

    def _check_queries(self, queries: Sequence[str] | str, n: int) -> list[str]:
        qs = [queries] * n if isinstance(queries, str) else list(queries)
        if len(qs) != n:
            raise DataError(f"{len(qs)} queries for {n} images: give one query, or one per image")
        for i, q in enumerate(qs):
            why = self.query_rules.problem(q)
            if why is not None:
                raise DataError(f"query {i}: {why}", rows=[i])
        return qs

    def _inputs(self, images: list[Any], prompts: list[str]) -> Any:
        # Left padding: every row's last position is its own last prompt token, so one batch of
        # mixed prompt lengths gives what each row alone gives.
        batch = self.processor(
            images=[bound_aspect(im) for im in images],
            text=prompts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        batch = batch.to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch

    def _answer_logsumexp(
        self, images: list[Any], prompts: list[str], groups: tuple[tuple[int, ...], ...]
    ) -> torch.Tensor:
        """(N, len(groups)) float32: logsumexp of each group's next-token logits per image.

        A row whose logits are not all finite is NaN in every group (logged once per call): each
        row's logits depend on its own image and prompt alone (left padding, masked), so the
        others stand. Errors that are not one image's (the forward raising) still raise.
        """
        out = []
        bad_rows: list[int] = []
        step = self.config.max_batch
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), step):
                inputs = self._inputs(images[start : start + step], prompts[start : start + step])
                # generate() with one new token, reading the raw logits: it builds the position
                # ids of left-padded rows the way each architecture needs (plain or multimodal
                # RoPE), which a hand-made forward call would have to know per model.
                gen = self.model.generate(
                    **inputs,
                    max_new_tokens=1,
                    do_sample=False,
                    num_beams=1,
                    output_logits=True,
                    return_dict_in_generate=True,
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                )
                logits = gen.logits[0].float().cpu()  # (b, vocab), before any logits processor
                # The whole row, not only the answer tokens: an inf elsewhere is an overflow the
                # answer logits went through too.
                bad = ~torch.isfinite(logits).all(dim=-1)
                lse = torch.stack([logits[:, list(g)].logsumexp(-1) for g in groups], -1)
                lse[bad] = torch.nan
                bad_rows += [start + int(i) for i in torch.nonzero(bad).flatten()]
                out.append(lse)
        if bad_rows:
            more = f" and {len(bad_rows) - 10} more" if len(bad_rows) > 10 else ""
            wide = self.dtype == torch.float32
            log.warning(
                "%s: non-finite logits for %d of %d image(s), rows %s%s (dtype %s): scored NaN; %s",
                self.config.source,
                len(bad_rows),
                len(images),
                bad_rows[:10],
                more,
                str(self.dtype).removeprefix("torch."),
                "check those images" if wide else "try dtype float32",
            )
        return torch.cat(out)


def render_prompt(processor: Any, text: str, answer_prefix: str = "") -> str:
    """One user turn (an image, then ``text``) through the processor's chat template, with the
    assistant's turn opened and, if given, started with ``answer_prefix``.

    The prefix is joined with one space unless the template's generation prompt already ends in
    whitespace (Llava-1.5's ends in "ASSISTANT:").
    """
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    ]
    prompt = str(
        processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    )
    if answer_prefix:
        prompt += answer_prefix if prompt[-1:].isspace() else " " + answer_prefix
    return prompt


def answer_token_ids(tokenizer: Any, prompt: str, word: str) -> tuple[int, ...]:
    """The single tokens that spell ``word`` as the next token after ``prompt`` (rule above).

    Returns:
        The distinct ids, sorted; empty when no variant of the word is a single token there.
    """
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    found: set[int] = set()
    for variant in dict.fromkeys((f" {word}", word, f" {word.capitalize()}", word.capitalize())):
        ids = tokenizer(prompt + variant, add_special_tokens=False)["input_ids"]
        if len(ids) != len(base) + 1 or ids[: len(base)] != base or ids[-1] in special:
            continue  # several pieces, or the word merged into the prompt's last token
        if str(tokenizer.decode([ids[-1]])).strip().lower() == word.lower():
            found.add(int(ids[-1]))
    return tuple(sorted(found))


# ---------------------------------------------------------------------------------------------
# Loading


def load_vlm(config: VlmConfig, *, cache_dir: str | Path | None = None) -> VlmJudge:
    """Load a VLM judge and check it can score what it is asked to.

    Args:
        config: source, device, dtype and prompts.
        cache_dir: keeper's cache root: an ``s3://`` model goes to ``<cache_dir>/vlm``, a hub
            model to ``<cache_dir>/hub``. Default ``$KEEPER_CACHE_DIR`` or ``~/.cache/keeper``
            for S3, and Hugging Face's own cache (``HF_HOME``) for the hub.

    Returns:
        A judge with the model in eval mode on ``config.device``.

    Raises:
        ModelLoadError: naming the source and the cause: transformers missing, no such folder,
            an S3 prefix that cannot be listed or downloaded, a hub id that cannot be fetched
            (offline, unknown), no chat template, no image token, an answer word that is not a
            single token at the answer position, cuda asked for but absent. Never falls back to
            other weights.
    """
    transformers = _transformers(config.source)
    source = config.source.strip()
    device, dtype = _device_dtype(config)
    kind = source_kind(source)
    root = Path(cache_dir) if cache_dir is not None else None
    local_dir: Path | None = None
    extra: dict[str, Any] = {}
    if kind == "local":
        local_dir = _local_path(source)
        if not local_dir.is_dir():
            what = "not a directory" if local_dir.exists() else "no such directory"
            raise ModelLoadError(source, f"{what}: {local_dir}")
    elif kind == "s3":
        local_dir = fetch_s3_model(source, cache_dir=(root or _default_cache_root()) / "vlm")
    elif root is not None:
        extra["cache_dir"] = str(root / "hub")
    where = str(local_dir) if local_dir is not None else source
    try:
        processor = transformers.AutoProcessor.from_pretrained(where, **extra)
        model: Any = transformers.AutoModelForImageTextToText.from_pretrained(
            where, dtype=dtype, **extra
        )
    except Exception as e:  # OSError (missing, offline), ValueError (unknown architecture), ...
        raise ModelLoadError(source, f"{type(e).__name__}: {e}") from e
    model.to(device).eval()
    token_ids = _validate(config, processor, model)
    return VlmJudge(
        config=config,
        model=model,
        processor=processor,
        local_dir=local_dir,
        random_weights=_random_weights(source, local_dir),
        answer_token_ids=token_ids,
    )


def _transformers(source: str) -> Any:
    """The transformers module, or a ModelLoadError naming ``source`` and what to install."""
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError(source, f"transformers is not installed ({INSTALL_HINT})") from e
    return transformers


@contextlib.contextmanager
def _small_files(
    source: str, cache_dir: str | Path | None, wanted: Callable[[str], bool] | tuple[str, ...]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Where transformers reads ``source``'s small files (config, processor) from, with its
    keyword arguments: a local folder as it is, a hub id through keeper's cache, and of an
    ``s3://`` prefix the files ``wanted`` copied into a temporary folder, for as long as the block
    runs: by name (one GET each, no listing), or those whose key under the prefix it accepts."""
    kind = source_kind(source)
    extra: dict[str, Any] = {}
    if kind == "hub" and cache_dir is not None:
        extra["cache_dir"] = str(Path(cache_dir) / "hub")
    with tempfile.TemporaryDirectory() as tmp:
        where = source
        if kind == "local":
            where = str(_local_path(source))
        elif kind == "s3":
            base = source.rstrip("/")
            if isinstance(wanted, tuple):
                named = [(name, storage.join(base, name)) for name in wanted]
            else:
                keys = ((_relative_key(source, base, u), u) for u in storage.list_files(base))
                named = [(rel, uri) for rel, uri in keys if wanted(rel)]
            for rel, uri in named:
                target = Path(tmp) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(storage.read_bytes(uri))
            where = tmp
        yield where, extra


def parameter_count(source: str, *, cache_dir: str | Path | None = None) -> int:
    """Parameters of the VLM at ``source``, from its ``config.json`` alone: the model is built on
    torch's meta device (no weights read, nothing downloaded but the config).

    Raises:
        ModelLoadError: transformers missing, or the config cannot be read or built (no such
            folder, no ``config.json`` under the ``s3://`` prefix, a hub id offline).
    """
    source = source.strip()
    transformers = _transformers(source)
    try:
        with _small_files(source, cache_dir, ("config.json",)) as (where, extra):
            config = transformers.AutoConfig.from_pretrained(where, **extra)
            with torch.device("meta"):
                model = transformers.AutoModelForImageTextToText.from_config(config)
    except Exception as e:  # OSError, StorageError, ValueError (unknown architecture), ...
        raise ModelLoadError(source, f"cannot read its config: {type(e).__name__}: {e}") from e
    return sum(p.numel() for p in model.parameters())


def query_rules(config: VlmConfig, *, cache_dir: str | Path | None = None) -> QueryRules:
    """The :class:`QueryRules` a judge loaded from ``config`` applies, from the checkpoint's
    processor alone (tokenizer, image processor and chat template files; no weights are read,
    and from an ``s3://`` prefix none are downloaded), so a batch job can check its queries
    before it starts any actor.

    Raises:
        ModelLoadError: transformers missing, or the processor cannot be read (no such folder,
            an S3 prefix that cannot be listed, a hub id offline).
    """
    source = config.source.strip()
    transformers = _transformers(source)

    def small(rel: str) -> bool:
        return not rel.lower().endswith(_WEIGHT_SUFFIXES)

    try:
        with _small_files(source, cache_dir, small) as (where, extra):
            processor = transformers.AutoProcessor.from_pretrained(where, **extra)
            if getattr(processor, "tokenizer", None) is None:
                raise ValueError(f"its processor is {type(processor).__name__}, with no tokenizer")
            reserved = reserved_tokens(processor)
    except Exception as e:  # OSError, StorageError, ValueError (unknown architecture), ...
        raise ModelLoadError(source, f"cannot read its processor: {type(e).__name__}: {e}") from e
    return QueryRules(config.max_query_chars, reserved)


def actor_memory(config: VlmConfig, *, cache_dir: str | Path | None = None) -> int:
    """Bytes a VLM actor asks Ray for: its baseline and the weights in the dtype they load in
    (fp32 on CPU, else bf16 unless ``dtype: float32``), plus 25 % headroom. The weights pass
    through host memory while they load, on a GPU actor too.

    Raises:
        ModelLoadError: as ``parameter_count``.
    """
    wide = config.device == "cpu" or config.dtype == "float32"
    params = parameter_count(config.source, cache_dir=cache_dir)
    return actor_memory_request((4 if wide else 2) * params)


def _device_dtype(config: VlmConfig) -> tuple[torch.device, torch.dtype]:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(config.source, "device cuda asked for, but torch sees no GPU")
    if config.dtype == "float32" or config.device == "cpu":
        return torch.device(config.device), torch.float32
    if config.dtype == "auto" and not torch.cuda.is_bf16_supported():
        return torch.device("cuda"), torch.float32  # fp16 overflows in Llama activations
    return torch.device("cuda"), torch.bfloat16


def _validate(config: VlmConfig, processor: Any, model: Any) -> dict[str, tuple[int, ...]]:
    """Check the processor and tokenizer can make the judge's prompts; the answer token ids."""
    source = config.source
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(
            source, f"not a vision-language checkpoint: its processor is {type(processor).__name__}"
        )
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(source, "the processor has no chat template (chat_template.jinja)")
    image_token = getattr(processor, "image_token", None)
    if not isinstance(image_token, str) or not image_token:
        raise ModelLoadError(source, "the processor names no image token")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ModelLoadError(source, f"the tokenizer has no image token ({image_token!r})")
    model_image_id = getattr(model.config, "image_token_id", None)
    if model_image_id is not None and int(model_image_id) != int(image_id):
        raise ModelLoadError(
            source,
            f"the processor's image token id {image_id} is not the model's ({model_image_id})",
        )
    if tokenizer.pad_token_id is None:
        # Batches need a pad token; padded positions are masked, so eos is as good as any.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(source, "the tokenizer has neither a pad nor an eos token")

    try:
        rel_prompt = render_prompt(
            processor, config.relevance_template.replace(_QUERY, _PROBE_QUERY)
        )
        qual_prompt = render_prompt(processor, config.quality_prompt, config.quality_answer_prefix)
    except Exception as e:  # a template that cannot render one image and one text
        raise ModelLoadError(source, f"the chat template failed: {type(e).__name__}: {e}") from e
    if rel_prompt.count(image_token) != 1:
        raise ModelLoadError(
            source, f"the chat template does not place one {image_token!r} for one image"
        )

    ids: dict[str, tuple[int, ...]] = {}
    for words, prompt, role in (
        ((config.yes_word, config.no_word), rel_prompt, "relevance"),
        (config.level_words, qual_prompt, "quality"),
    ):
        owner: dict[int, str] = {}
        for w in words:
            found = answer_token_ids(tokenizer, prompt, w)
            if not found:
                raise ModelLoadError(
                    source,
                    f"the {role} answer word {w!r} is not a single token after the prompt "
                    f"...{prompt[-30:]!r} in any of ' {w}', '{w}', ' {w.capitalize()}', "
                    f"'{w.capitalize()}': the score would not be P({w})",
                )
            for t in found:
                if t in owner:
                    raise ModelLoadError(
                        source, f"answer words {owner[t]!r} and {w!r} share token {t}"
                    )
                owner[t] = w
            ids[w] = found
    vocab = _output_vocab(model)
    too_big = [w for w, t in ids.items() if vocab is not None and max(t) >= vocab]
    if too_big:
        raise ModelLoadError(source, f"answer token ids of {too_big} exceed the model's {vocab}")
    return ids


def _output_vocab(model: Any) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def _random_weights(source: str, local_dir: Path | None) -> bool:
    if local_dir is None or not (local_dir / KEEPER_JSON).is_file():
        return False
    try:
        meta = json.loads((local_dir / KEEPER_JSON).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(source, f"unreadable {KEEPER_JSON}: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("random_weights", False), bool):
        raise ModelLoadError(source, f"{KEEPER_JSON}: random_weights must be true or false")
    return bool(meta.get("random_weights", False))


def _check_images(images: Sequence[Any]) -> list[Any]:
    from PIL import Image

    if isinstance(images, Image.Image):
        raise DataError("expected a sequence of images, got one image: wrap it in a list")
    imgs = list(images)
    if not imgs:
        raise DataError("no images to score")
    for i, im in enumerate(imgs):
        if not isinstance(im, Image.Image):
            raise DataError(f"image {i}: expected a PIL image, got {type(im).__name__}", rows=[i])
    return imgs


def _as_scores(x: torch.Tensor) -> np.ndarray:
    # Rounding can put a weighted softmax a few ulp past 1; np.clip keeps NaN (an unjudged row).
    return np.clip(x.detach().cpu().numpy().astype(np.float32), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# S3 model cache


def _default_cache_root() -> Path:
    # The same root storage.download_cached uses (it adds "s3"; models go under "vlm").
    root = os.environ.get("KEEPER_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "keeper"


def fetch_s3_model(prefix: str, *, cache_dir: str | Path) -> Path:
    """A local folder holding every object under an ``s3://`` prefix, downloaded once per version.

    The folder is ``<cache_dir>/models/<bucket>/<digest>``, where the digest covers the prefix and every
    object's relative key, size and ETag: a changed, added or removed object gives a new folder,
    and an unchanged model costs one listing and one HEAD per object. Objects are downloaded with
    ``storage.download_cached`` into ``<cache_dir>/objects`` (so a new version of a model
    downloads only the objects that changed) and hard-linked into a staging folder that is renamed
    into place whole: a crash or a concurrent loader never sees a partial model.

    Args:
        prefix: ``s3://bucket/prefix`` (the checkpoint folder).
        cache_dir: where the model folders and objects go.

    Returns:
        The model folder.

    Raises:
        ModelLoadError: the prefix cannot be listed or is empty, a key escapes the folder
            (``..``), a download failed, or an object changed while it was being downloaded.
    """
    base = prefix.rstrip("/")
    root = Path(cache_dir)
    try:
        bucket, _ = storage.split_s3(base)
        uris = storage.list_files(base)
        entries = [(_relative_key(prefix, base, u), storage.object_info(u)) for u in uris]
    except StorageError as e:
        raise ModelLoadError(prefix, f"cannot list the model's objects: {e}") from e
    if not entries:
        raise ModelLoadError(prefix, "no objects under this prefix")
    listing = [(rel, info.size, info.etag) for rel, info in entries]
    digest = hashlib.sha256(json.dumps([base, listing]).encode()).hexdigest()[:24]
    final = root / "models" / bucket / digest
    if _complete(final, listing):
        return final

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        model_dir = staging / "model"
        for rel, _, _ in listing:
            uri = storage.join(base, rel)
            try:
                got = storage.download_cached(uri, cache_dir=root / "objects")
            except StorageError as e:
                raise ModelLoadError(prefix, f"cannot download {rel}: {e}") from e
            target = model_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(got, target)
        # download_cached reads whatever version is current; a model updated during the download
        # would mix versions under the old digest. Check nothing moved.
        try:
            moved = [
                rel
                for rel, _, etag in listing
                if storage.object_info(storage.join(base, rel)).etag != etag
            ]
        except StorageError as e:
            raise ModelLoadError(prefix, f"cannot re-check the model's objects: {e}") from e
        if moved:
            raise ModelLoadError(prefix, f"{moved} changed while downloading; load again")
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(model_dir, final)
        except OSError:
            if not _complete(final, listing):  # not a concurrent loader that got there first
                raise
    except OSError as e:
        raise ModelLoadError(prefix, f"cannot write the model cache {root}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _relative_key(prefix: str, base: str, uri: str) -> str:
    rel = uri[len(base) + 1 :]
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") for p in parts):
        raise ModelLoadError(prefix, f"object {uri} does not name a file inside the model folder")
    return rel


def _complete(folder: Path, listing: list[tuple[str, int, str]]) -> bool:
    with contextlib.suppress(OSError):
        return folder.is_dir() and all(
            (folder / rel).is_file() and (folder / rel).stat().st_size == size
            for rel, size, _ in listing
        )
    return False


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no second copy of a multi-GB shard
    except OSError:
        shutil.copyfile(src, dst)  # a filesystem without hard links: same bytes, more disk
