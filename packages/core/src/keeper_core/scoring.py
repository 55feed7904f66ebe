"""Scores from CLIP embeddings: aesthetic quality, relevance to prompts, CLIPScore, combinations.

Every function here is pure numpy over embedding matrices, so a Ray Data batch job, a Serve
replica and a test compute the same numbers. Embeddings are L2-normalised float32 arrays
``(N, D)``; a dot product is a cosine. Typical use::

    config = AestheticConfig.default()
    prompts = embedder.prompt_embeddings(config.all_prompts())   # one text batch
    scores = aesthetic_scores(image_emb, prompts, config)        # .total, .dimensions
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from keeper_core.errors import ConfigError, DataError

#: Allowed deviation of an embedding's L2 norm from 1 (bf16 encoders land well inside it).
NORM_TOLERANCE = 1e-3

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


def check_embeddings(x: Any, name: str, *, dim: int | None = None, min_rows: int = 0) -> np.ndarray:
    """Validates an embedding matrix and returns it unchanged.

    Args:
        x: the array to check; must be a float32 numpy array of shape (N, D), finite, unit rows.
        name: the argument name used in error messages.
        dim: the required D, if known (e.g. the image embeddings' width).
        min_rows: the smallest N allowed.

    Raises:
        DataError: naming ``name`` and, for bad rows, the first offending row numbers.
    """
    if not isinstance(x, np.ndarray):
        raise DataError(f"{name}: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] == 0:
        raise DataError(f"{name}: expected shape (N, D) with D >= 1, got {x.shape}")
    if x.dtype != np.float32:
        raise DataError(f"{name}: expected float32 embeddings, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise DataError(f"{name}: dimension {x.shape[1]} does not match {dim}")
    if x.shape[0] < min_rows:
        raise DataError(f"{name}: needs at least {min_rows} row(s), got {x.shape[0]}")
    # Row norms via einsum: no (N, D) temporary. A NaN/inf anywhere makes its row's norm non-finite,
    # so this one pass also checks finiteness.
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    bad = np.flatnonzero(~(np.abs(norms - 1.0) <= NORM_TOLERANCE))
    if bad.size:
        rows = bad[:10].tolist()
        raise DataError(
            f"{name}: {bad.size} row(s) are not finite unit vectors "
            f"(row {rows[0]} has norm {norms[rows[0]]:.4g}); L2-normalise embeddings first",
            rows=rows,
        )
    return x


def check_scores(x: Any, name: str, *, n: int | None = None) -> np.ndarray:
    """Validates a 1-D array of finite scores and returns it as float64."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name}: not a numeric array ({e})") from None
    if arr.ndim != 1:
        raise DataError(f"{name}: expected shape (N,), got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise DataError(f"{name}: length {arr.shape[0]} does not match {n}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataError(f"{name}: {bad.size} non-finite value(s)", rows=bad[:10].tolist())
    return arr


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, elementwise, in ``x``'s dtype (exp of -|x| never overflows)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


# --------------------------------------------------------------------------- aesthetic config


class PromptPair(BaseModel):
    """A contrastive pair: the image is scored by how much more it matches ``positive``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Prompt
    positive: Prompt
    negative: Prompt

    @model_validator(mode="after")
    def _distinct(self) -> PromptPair:
        if self.positive == self.negative:
            raise ValueError("positive and negative must be different texts")
        return self


class AestheticWeights(BaseModel):
    """Weights of the three parts of the total; normalised by their sum when scoring."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    pairs: float = Field(default=0.5, ge=0)
    positive: float = Field(default=0.3, ge=0)
    negative: float = Field(default=0.2, ge=0)

    @model_validator(mode="after")
    def _positive_sum(self) -> AestheticWeights:
        if self.pairs + self.positive + self.negative <= 0:
            raise ValueError("weights must not all be zero")
        return self


class AestheticConfig(BaseModel):
    """The prompt set and weights of the aesthetic score.

    Attributes:
        pairs: contrastive prompt pairs; each becomes one dimension named after the pair.
        positive: attribute prompts a good photo matches ("professional photography").
        negative: attribute prompts a bad photo matches ("amateur snapshot"); inverted.
        weights: weights of the pair mean, the positive and the negative score.
        logit_scale: multiplies cosine gaps before the sigmoid (CLIP's learned scale is 100).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    pairs: list[PromptPair] = Field(min_length=1)
    positive: list[Prompt] = Field(min_length=1)
    negative: list[Prompt] = Field(min_length=1)
    weights: AestheticWeights = Field(default_factory=AestheticWeights)
    logit_scale: float = Field(default=100.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> AestheticConfig:
        names = [p.name for p in self.pairs]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"pairs: duplicate names {dups}")
        reserved = sorted(set(names) & {"positive", "negative"})
        if reserved:
            raise ValueError(f"pairs: names {reserved} are reserved for the attribute scores")
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            raise ValueError(f"positive and negative share prompts {both}")
        return self

    def all_prompts(self) -> list[str]:
        """Every prompt text once, in a stable order (pairs, positive, negative): embed these."""
        texts = [t for p in self.pairs for t in (p.positive, p.negative)]
        return list(dict.fromkeys([*texts, *self.positive, *self.negative]))

    @classmethod
    def from_yaml(cls, source: str | Path) -> AestheticConfig:
        """Loads a config from a YAML file (a Path, or a str ending in .yaml/.yml) or YAML text.

        Raises:
            ConfigError: the file is missing, the YAML is malformed, or a field is invalid
                (the message names the field, e.g. ``pairs.0.positive``).
        """
        where = "aesthetic config"
        if isinstance(source, Path) or (
            "\n" not in source and source.strip().endswith((".yaml", ".yml"))
        ):
            where = str(source)
            try:
                source = Path(source).read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"{where}: cannot read ({e})") from None
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{where}: {_describe(e)}") from None

    @classmethod
    def default(cls) -> AestheticConfig:
        """The prompt set shipped with keeper (``keeper_core/prompts/aesthetic.yaml``)."""
        text = resources.files("keeper_core").joinpath("prompts/aesthetic.yaml").read_text("utf-8")
        return cls.from_yaml(text)

    def to_yaml(self) -> str:
        """The config as YAML text that ``from_yaml`` reads back to an equal config."""
        return yaml.safe_dump(self.model_dump(), sort_keys=False, allow_unicode=True)


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- prompt embeddings


@dataclass(frozen=True)
class PromptEmbeddings:
    """Prompt texts and their embeddings, row i of ``embeddings`` belonging to ``texts[i]``."""

    texts: tuple[str, ...]
    embeddings: np.ndarray  # (T, D) float32, unit rows

    def __post_init__(self) -> None:
        check_embeddings(self.embeddings, "prompt_emb")
        if len(self.texts) != self.embeddings.shape[0]:
            raise DataError(
                f"prompt_emb: {len(self.texts)} texts but {self.embeddings.shape[0]} embeddings"
            )
        if len(set(self.texts)) != len(self.texts):
            raise DataError("prompt_emb: texts must be unique")

    @classmethod
    def from_mapping(cls, prompts: Mapping[str, np.ndarray]) -> PromptEmbeddings:
        """Builds from ``{text: embedding (D,) or (1, D)}``, the form ClipEmbedder returns."""
        rows = []
        for text, v in prompts.items():
            v = v[None, :] if isinstance(v, np.ndarray) and v.ndim == 1 else v
            rows.append(check_embeddings(v, f"prompt_emb[{text!r}]", min_rows=1))
            if v.shape[0] != 1:
                raise DataError(f"prompt_emb[{text!r}]: expected one vector, got {v.shape}")
        if not rows:
            raise DataError("prompt_emb: no prompt embeddings given")
        dims = {r.shape[1] for r in rows}
        if len(dims) > 1:
            raise DataError(f"prompt_emb: embeddings of different dimensions {sorted(dims)}")
        return cls(tuple(prompts), np.concatenate(rows))

    def lookup(self, texts: list[str]) -> np.ndarray:
        """The embeddings of ``texts`` (k, D); DataError naming every text that is missing."""
        index = {t: i for i, t in enumerate(self.texts)}
        missing = [t for t in texts if t not in index]
        if missing:
            raise DataError(f"prompt_emb: missing embeddings for prompts {missing}")
        return self.embeddings[[index[t] for t in texts]]


def _as_prompts(prompt_emb: Mapping[str, np.ndarray] | PromptEmbeddings) -> PromptEmbeddings:
    if isinstance(prompt_emb, PromptEmbeddings):
        return prompt_emb
    return PromptEmbeddings.from_mapping(prompt_emb)


# --------------------------------------------------------------------------- aesthetic scores


@dataclass(frozen=True)
class AestheticScores:
    """Aesthetic scores of N images, each in [0, 1], higher is better.

    Attributes:
        total: (N,) weighted mean of the pair mean, ``positive`` and ``negative``.
        dimensions: (N,) per pair name, plus ``positive`` and ``negative`` (already inverted).
    """

    total: np.ndarray
    dimensions: dict[str, np.ndarray]


def aesthetic_scores(
    image_emb: np.ndarray,
    prompt_emb: Mapping[str, np.ndarray] | PromptEmbeddings,
    config: AestheticConfig,
) -> AestheticScores:
    """Scores images for aesthetic quality with contrastive and attribute prompts.

    With ``s = config.logit_scale`` and ``c(t)`` the cosine between an image and prompt ``t``:

    - pair ``(p, n)``: ``P(p | {p, n}) = softmax(s * [c(p), c(n)])[0] = sigmoid(s * (c(p) - c(n)))``.
    - attributes: ``m`` is the image's mean cosine over all attribute prompts (positive and
      negative). Attribute ``a`` scores ``sigmoid(s * (c(a) - m))``: the Bradley-Terry probability
      that the image prefers ``a`` to its average attribute prompt. Centring on ``m`` cancels the
      per-image offset of CLIP cosines (some images are closer to every text). ``positive`` is
      the mean over positive attributes; ``negative`` is 1 minus the mean over negative ones.
    - total: ``(w_pairs * mean(pairs) + w_pos * positive + w_neg * negative) / sum(w)``.

    Args:
        image_emb: (N, D) image embeddings.
        prompt_emb: embeddings of at least ``config.all_prompts()``, as a mapping text -> (D,)
            or a PromptEmbeddings.
        config: the prompt set and weights.

    Returns:
        AestheticScores with float32 (N,) arrays in [0, 1].

    Raises:
        DataError: malformed embeddings, a dimension mismatch, or prompts without embeddings.
    """
    img = check_embeddings(image_emb, "image_emb")
    prompts = _as_prompts(prompt_emb)
    texts = config.all_prompts()
    text_emb = prompts.lookup(texts)
    if text_emb.shape[1] != img.shape[1]:
        raise DataError(
            f"prompt_emb: dimension {text_emb.shape[1]} does not match image_emb {img.shape[1]}"
        )
    cos = img @ text_emb.T  # (N, T)
    col = {t: i for i, t in enumerate(texts)}
    s = np.float32(config.logit_scale)

    dims: dict[str, np.ndarray] = {}
    for p in config.pairs:
        dims[p.name] = sigmoid(s * (cos[:, col[p.positive]] - cos[:, col[p.negative]]))
    pos = cos[:, [col[t] for t in config.positive]]
    neg = cos[:, [col[t] for t in config.negative]]
    anchor = np.concatenate([pos, neg], axis=1).mean(axis=1, keepdims=True)
    dims["positive"] = sigmoid(s * (pos - anchor)).mean(axis=1)
    dims["negative"] = 1.0 - sigmoid(s * (neg - anchor)).mean(axis=1)

    w = config.weights
    pair_mean = np.mean([dims[p.name] for p in config.pairs], axis=0)
    total = (
        w.pairs * pair_mean + w.positive * dims["positive"] + w.negative * dims["negative"]
    ) / (w.pairs + w.positive + w.negative)
    return AestheticScores(total=total.astype(np.float32), dimensions=dims)


# --------------------------------------------------------------------------- relevance


def relevance_score(
    image_emb: np.ndarray, positive_emb: np.ndarray, negative_emb: np.ndarray | None = None
) -> np.ndarray:
    """Relevance to a query: ``max cos(image, positives) - max cos(image, negatives)``.

    Args:
        image_emb: (N, D) image embeddings.
        positive_emb: (P, D) embeddings of what is wanted, P >= 1.
        negative_emb: (Q, D) embeddings of what is not wanted; None or Q = 0 means none,
            and the score is then just the max cosine to the positives.

    Returns:
        (N,) float32 scores in [-2, 2] ([-1, 1] without negatives).
    """
    img = check_embeddings(image_emb, "image_emb")
    d = img.shape[1]
    pos = check_embeddings(positive_emb, "positive_emb", dim=d, min_rows=1)
    score = (img @ pos.T).max(axis=1)
    if negative_emb is not None:
        neg = check_embeddings(negative_emb, "negative_emb", dim=d)
        if neg.shape[0]:
            score = score - (img @ neg.T).max(axis=1)
    return score


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """CLIPScore of every image against every text: ``max(100 * cos, 0)``, shape (N, T)."""
    img = check_embeddings(image_emb, "image_emb")
    txt = check_embeddings(text_emb, "text_emb", dim=img.shape[1], min_rows=1)
    return np.maximum(np.float32(100.0) * (img @ txt.T), np.float32(0.0))


def prompt_softmax(
    image_emb: np.ndarray, text_emb: np.ndarray, temperature: float = 0.01
) -> np.ndarray:
    """Probabilities over a prompt set: ``softmax(cos / temperature)`` per image, shape (N, T).

    The default temperature 0.01 is CLIP's learned logit scale of 100. Rows sum to 1, for
    every finite temperature > 0: the cosines are shifted by each row's maximum before they are
    divided, in float64, so a tiny temperature (float32 has no 1e-46; 1e-39 is a denormal whose
    quotients overflow) sharpens to a one-hot row (ties share it) instead of inf / inf = NaN.
    Returned as float32, the embeddings' dtype.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")
    img = check_embeddings(image_emb, "image_emb")
    txt = check_embeddings(text_emb, "text_emb", dim=img.shape[1], min_rows=1)
    cos = img.astype(np.float64) @ txt.T.astype(np.float64)
    z = (cos - cos.max(axis=1, keepdims=True)) / float(temperature)  # <= 0: exp cannot overflow
    e = np.exp(z)  # the maximum's 0 / t is 0, so every row has a 1
    out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def combined_score(
    s_clip: npt.ArrayLike,
    s_vlm: npt.ArrayLike | None = None,
    s_head: npt.ArrayLike | None = None,
    *,
    alpha: float = 1.0,
    beta: float = 0.0,
    gamma: float = 0.0,
) -> np.ndarray:
    """``alpha * s_clip + beta * s_vlm + gamma * s_head`` over N images, as float64 (N,).

    A score that is given with weight 0 is still validated but does not count. Weights must
    be finite and >= 0, and a positive weight needs its score.

    Raises:
        ConfigError: a weight is negative or not finite.
        DataError: a weighted score is missing, or scores are not finite 1-D arrays of one length.
    """
    clip = check_scores(s_clip, "s_clip")
    total = np.zeros_like(clip)
    for name, score, wname, w in (
        ("s_clip", s_clip, "alpha", alpha),
        ("s_vlm", s_vlm, "beta", beta),
        ("s_head", s_head, "gamma", gamma),
    ):
        if not (np.isfinite(w) and w >= 0):
            raise ConfigError(f"{wname} must be a finite number >= 0, got {w}")
        if score is None:
            if w > 0:
                raise DataError(f"{wname}={w} but {name} is missing")
            continue
        arr = check_scores(score, name, n=clip.shape[0])
        if w > 0:
            total += w * arr
    return total
