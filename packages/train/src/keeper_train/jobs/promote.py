"""Gate a registered ranker: move @champion to @challenger only if it is measurably better.

    keeper promote keeper-ranker --embeddings keeper-demo/embeddings/keeper-tiny_random \
        --series keeper-demo/test-manifest.csv --min-gain 0.01
    keeper promote keeper-ranker --rollback
    keeper promote keeper-ranker --version 3 --force ...   # a rolled-back version, on purpose
    python -m keeper_train.jobs.promote ...                # the same command

Both versions are evaluated on the same series (jobs.evaluate) and ``decide`` applies the rule:

- with a champion: the top-1 gain is at least ``min_gain`` (absolute, 0.01 = 1 point), the lower
  bound of its exact 95 % confidence interval is above 0 (above ``min_gain`` when that is
  negative, i.e. a drop the user allows), and MRR does not regress. The interval comes from the
  series where the two disagree (``metrics.paired_top1_gain``): its lower bound is above 0 exactly
  when a one-sided exact sign test on per-series wins vs losses says "better" at 2.5 %;
- with none: the challenger's top-1 beats the random baseline, and so does the lower bound of its
  exact (Clopper-Pearson) interval.

The interval is what a small promotion set can show: on 24 series one series is 4.2 points, and
a challenger that finds the keeper on 4 more series than the champion and loses none (+16.7
points) is still within chance; 6 are not. ``ci_gate=False`` (``--no-ci-gate``) drops the test.

With ``--online ROOT`` (a serving feedback root, docs/feedback.md) the online A/B counts too:
the challenger arm must have served the version judged, and that version's online top-1 gain
over the champion (``keeper ab-report``'s figure: of the groups where a person picked a keeper, the
share the model ranked first) must reach ``--min-online-gain`` with the lower bound of its Newcombe
interval above 0 (above ``min_online_gain`` when that is negative). It is measured on the version's
own answers against the champion version's over the same time (``keeper_core.ab.version_ab``), not
on the arms': an arm pools every version that answered for it, and the challenger arm's history
holds the wins of the challenger before, now the champion. Both halves must pass; both are recorded.

Refused before anything is judged: promotion series that share images with the challenger's
recorded train or val split (train_head's ``split.csv`` artifact), a split that cannot be read
(the gate fails closed), and a version that was rolled back (``keeper.rollback.*`` tags), unless
it is named with ``--version N --force``. The champion's own split is checked too: the incumbent
is not refused, but series it trained on inflate its numbers and skew the comparison against the
challenger, which a warning (and the ``champion_overlap`` tag) says. A version is named as the
registry spells it (``--version 03`` is v3), so the champion is never judged against itself.

Nothing is moved or tagged if @champion changed while the versions were being evaluated (another
promote or rollback): the comparison was against a champion that no longer serves.

The decision, both versions' numbers and the interval are recorded as ``keeper.promotion.*`` tags
on the version judged. The replaced champion is kept as alias ``previous-champion`` (and as the
new champion's ``keeper.promotion.previous_champion`` tag, so rollbacks can walk back more than one
step). A rollback tags the version it takes out of service and removes its @challenger alias.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keeper_core import registry, storage
from keeper_core.ab import VersionAB, version_ab
from keeper_core.errors import ConfigError, DataError, KeeperError, ModelLoadError
from keeper_core.metrics import (
    Interval,
    SeriesMetrics,
    best_ranks,
    paired_top1_gain,
    top1_gain_over_chance,
)
from keeper_train import tracking
from keeper_train.jobs import ab_report, evaluate

TAG = "keeper.promotion."
ROLLBACK_TAG = "keeper.rollback."
# top-1 and MRR are ratios of small integers: a gain of exactly min_gain must not be lost to
# float rounding (0.3 - 0.29 < 0.01 in floating point).
_EPS = 1e-9


#: ``keeper promote --exit-code``'s status for a rejected challenger (2 is a refusal: bad
#: arguments, series the challenger trained on; 1 an unexpected error).
EXIT_REJECTED = 4


class PromoteConfig(BaseModel):
    """What ``keeper promote`` takes; the CLI's flags map onto these fields."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="registered model name")
    embeddings: str | None = Field(None, description="output of keeper embed (to evaluate on)")
    champion_embeddings: str | None = Field(
        None,
        description="the champion's own table, where its embedding spec is not the challenger's",
    )
    series: str | None = Field(None, description="held-out labelled series manifest")
    min_gain: float = Field(0.01, description="top-1 gain needed, absolute (0.01 = 1 point)")
    ci_gate: bool = Field(True, description="also require the gain's CI lower bound > 0")
    confidence: float = Field(0.95, gt=0, lt=1, description="coverage of the gain's interval")
    version: str | None = Field(None, description="judge this version instead of @challenger")
    force: bool = Field(False, description="allow a rolled-back version (needs version)")
    rollback: bool = Field(False, description="move @champion back to @previous-champion")
    tracking_uri: str | None = None
    data_dir: str = Field("keeper-data", description="embedded MLflow store when none is set")
    json_out: str | None = Field(None, description="also write the outcome here (path or s3://)")
    online: str | None = Field(
        None, description="a feedback root: also gate on the A/B's online top-1 gain"
    )
    min_online_gain: float = Field(0.0, description="online top-1 gain needed, absolute")
    exit_code: bool = Field(
        False, description=f"exit {EXIT_REJECTED} when the gate rejects the challenger"
    )

    @field_validator("min_gain", "min_online_gain")
    @classmethod
    def _min_gain(cls, v: float) -> float:
        check_min_gain(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PromoteConfig:
        if self.rollback and (self.version or self.force):
            raise ValueError("rollback takes no version or force")
        if not self.rollback and not (self.embeddings and self.series):
            raise ValueError("embeddings and series are required (except to roll back)")
        if self.force and not self.version:
            raise ValueError("force needs version: a rolled-back version is promoted by number")
        return self


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and why (recorded verbatim as a tag)."""

    promote: bool
    reason: str


def check_min_gain(min_gain: float) -> None:
    """min_gain is an absolute top-1 difference, so it lies in [-1, 1].

    Raises:
        ConfigError: it does not (e.g. 1.0 meant as "1 point" is allowed, 5 is not).
    """
    if not math.isfinite(min_gain) or not -1.0 <= min_gain <= 1.0:
        raise ConfigError(f"min_gain must be in [-1, 1] (0.01 = 1 point), got {min_gain}")


def top1_gain(
    challenger_ranks: Sequence[int] | np.ndarray,
    baseline_ranks: Sequence[int] | np.ndarray | None,
    sizes: Sequence[int] | np.ndarray,
    confidence: float = 0.95,
) -> Interval:
    """The challenger's top-1 gain with its exact interval over series.

    Args:
        challenger_ranks: rank of each series' keeper under the challenger (1 = top).
        baseline_ranks: the same under the champion (a paired sign-test interval, see
            ``paired_top1_gain``); None compares with a random ranking (mean 1 / len).
        sizes: images per series.
        confidence: the interval's coverage.
    """
    hit = np.asarray(challenger_ranks) == 1
    if baseline_ranks is None:
        chance = float(np.mean(1.0 / np.asarray(sizes, dtype=np.float64)))
        return top1_gain_over_chance(int(hit.sum()), len(hit), chance, confidence)
    base = np.asarray(baseline_ranks) == 1
    wins, losses = int((hit & ~base).sum()), int((~hit & base).sum())
    return paired_top1_gain(wins, losses, len(hit), confidence)


def decide(
    challenger: SeriesMetrics,
    champion: SeriesMetrics | None,
    min_gain: float,
    gain: Interval | None = None,
) -> Decision:
    """The promotion rule, on metrics of the same series (see the module docstring).

    Args:
        challenger, champion: metrics of the two on the same series (champion None: none yet).
        min_gain: top-1 gain needed over the champion.
        gain: the top-1 gain's interval (over the champion, else over random), from
            ``top1_gain``; None skips the interval test.

    Raises:
        ConfigError: min_gain outside [-1, 1].
        DataError: the two were measured on different numbers of series.
    """
    check_min_gain(min_gain)
    ci = f"; {gain.pts()}" if gain is not None else ""
    if champion is None:
        vs = f"top-1 {_pct(challenger.top1)} vs random {_pct(challenger.random_top1)}{ci}"
        if challenger.top1 <= challenger.random_top1 + _EPS:
            return Decision(False, f"no champion yet; {vs}: does not beat random")
        if gain is not None and gain.low <= _EPS:
            return Decision(False, f"no champion yet; {vs}: not surely better than random")
        return Decision(True, f"no champion yet; {vs}: beats random")
    if champion.n_series != challenger.n_series:
        raise DataError(
            f"challenger and champion measured on {challenger.n_series} and "
            f"{champion.n_series} series: compare them on the same series"
        )
    point = challenger.top1 - champion.top1
    mrr = f"MRR {champion.mrr:.3f} -> {challenger.mrr:.3f}"
    top1 = f"top-1 {_pct(champion.top1)} -> {_pct(challenger.top1)} ({100 * point:+.1f} pts"
    problems = []
    if point < min_gain - _EPS:
        problems.append(f"{top1}, below the {100 * min_gain:+.1f} required)")
    # A drop the user allows (min_gain < 0) is the bound; otherwise the gain must exclude 0.
    bound = min(min_gain, 0.0)
    if gain is not None and gain.low <= bound + _EPS:
        problems.append(
            f"not surely better: {gain.pts()} reaches {100 * bound:+.1f} pts "
            f"on {gain.n} series (one series is {100 / gain.n:.1f} pts)"
        )
    if challenger.mrr < champion.mrr - _EPS:
        problems.append(f"{mrr} regressed")
    if problems:
        return Decision(False, "; ".join(problems))
    return Decision(True, f"{top1}, >= {100 * min_gain:+.1f} required){ci}; {mrr}")


def served_as(name: str, version: str) -> str:
    """How the serving side names a registered version in its offers log (``model``)."""
    return f"models:/{name}/{version}"


def decide_online(ab: VersionAB, min_gain: float) -> Decision:
    """The online half of the rule: the challenger arm answered with the version judged, and that
    version's online top-1 gain over the champion arm since both were answering
    (:func:`keeper_core.ab.version_ab`: not the arm's, which pools every challenger it served) is at
    least ``min_gain`` with the interval's lower bound above ``min(min_gain, 0)`` (as offline: a
    drop the user allows is the bound).

    Raises:
        ConfigError: min_gain outside [-1, 1].
    """
    check_min_gain(min_gain)
    if ab.challenger not in ab.served:
        got = ", ".join(ab.served) or "nothing"
        return Decision(False, f"online: the challenger arm served {got}, not {ab.challenger}")
    against = ab.champion or "the champion arm"
    gain = ab.report.gain
    if ab.since is None or gain is None:
        return Decision(
            False,
            f"online: no keeper picked on {ab.challenger}'s answers or {against}'s "
            "since both were answering, no evidence",
        )
    bound = min(min_gain, 0.0)
    line = (
        f"online top-1 {gain.pts()} on {gain.n} groups ({ab.challenger} against {against} "
        f"since {ab.since:%Y-%m-%d %H:%M} UTC)"
    )
    if gain.estimate < min_gain - _EPS:
        return Decision(False, f"{line}: below the {100 * min_gain:+.1f} required")
    if gain.low <= bound + _EPS:
        return Decision(False, f"{line}: not surely better (reaches {100 * bound:+.1f} pts)")
    return Decision(True, line)


def retired(tags: Mapping[str, str]) -> bool:
    """A version a rollback took out of service and no promotion has put back since."""
    at = tags.get(ROLLBACK_TAG + "rolled_back_at")
    if at is None:
        return False
    again = tags.get(TAG + "timestamp") if tags.get(TAG + "decision") == "promoted" else None
    try:
        return again is None or datetime.fromisoformat(again) <= datetime.fromisoformat(at)
    except ValueError:  # a stamp edited by hand: retired, as its rollback said
        return True


def _earlier_champion(client: Any, name: str, restored: str, replaced: str | None) -> str | None:
    """The version @previous-champion names once ``restored`` is the champion again: the first
    along the ``previous_champion`` tags from it that is not retired, not seen before on the walk
    and not ``replaced``; None when there is none."""
    from mlflow.exceptions import MlflowException

    seen = {restored, replaced}
    version = client.get_model_version(name, restored).tags.get(TAG + "previous_champion")
    while version and version not in seen:
        seen.add(version)
        try:
            tags = client.get_model_version(name, version).tags
        except MlflowException:  # deleted since: nothing to go back to along this chain
            return None
        if not retired(tags):
            return str(version)
        version = tags.get(TAG + "previous_champion")
    return None


def rolled_back(tags: Mapping[str, str]) -> dict[str, str]:
    """A version's ``keeper.rollback.rolled_back_*`` tags: non-empty if a rollback retired it."""
    return {k: v for k, v in tags.items() if k.startswith(ROLLBACK_TAG + "rolled_back")}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _candidate(client: Any, cfg: PromoteConfig, aliases: Mapping[str, str]) -> tuple[str, Any]:
    """The version to judge (``cfg.version`` or @challenger) and its registry entry.

    Raises:
        ConfigError: no such version, no @challenger, or a rolled-back version not forced.
    """
    from mlflow.exceptions import MlflowException

    name = cfg.name
    version = cfg.version or aliases.get(tracking.CHALLENGER)
    if version is None:
        raise ConfigError(
            f"{name} has no @{tracking.CHALLENGER} version (train-head --register sets it; "
            "a rollback removes it from the version it retires)"
        )
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"{name} has no version {version}: {e.message}") from e
    # The registry's own spelling: MLflow reads "03" as version 3, and every comparison with an
    # alias (which holds "3") and every tag must see the same string.
    version = str(mv.version)
    retired = rolled_back(mv.tags or {})
    if retired and not (cfg.version and cfg.force):
        why = ", ".join(f"{k}={v}" for k, v in sorted(retired.items()))
        raise ConfigError(
            f"{name} v{version} was rolled back ({why}); it is promoted again only when named: "
            f"keeper promote {name} --version {version} --force"
        )
    return version, mv


def _recorded_overlap(client: Any, mv: Any, data: evaluate.EvalData) -> evaluate.Overlap | None:
    """The promotion series sharing images with ``mv``'s recorded train/val split; None when its
    run recorded none.

    Raises:
        ModelLoadError, DataError: the split exists but cannot be read (``training_split``).
    """
    split = tracking.training_split(client, mv.run_id)
    return evaluate.split_overlap(data.rows, split) if split is not None else None


def _same_manifest(client: Any, mv: Any, data: evaluate.EvalData) -> bool:
    """Whether ``mv``'s training run read this very manifest (its recorded sha256).

    Raises:
        ModelLoadError: the run cannot be read (other than gone: the version outlives its run).
    """
    from mlflow.exceptions import MlflowException

    if not mv.run_id:
        return False
    try:
        run_tags = client.get_run(mv.run_id).data.tags
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # a deleted run
            return False
        raise ModelLoadError(f"runs:/{mv.run_id}", f"cannot read the run: {e.message}") from e
    return bool(run_tags.get("keeper.manifest_sha256") == data.manifest_sha256)


def _check_overlap(client: Any, cand: Any, data: evaluate.EvalData) -> tuple[str, list[str]]:
    """Refuse promotion data the candidate trained or validated on; returns (tag, warnings).

    Raises:
        DataError: the promotion series overlap its recorded train/val split, or (no split
            recorded) the promotion manifest is the one its run trained on; or its split is
            unreadable.
        ModelLoadError: its split or run cannot be fetched.
    """
    label = f"{cand.name} v{cand.version}"
    overlap = _recorded_overlap(client, cand, data)
    if overlap is not None:
        if overlap.series:
            raise DataError(
                f"{overlap.describe()} share images with the series {label} was trained or "
                "validated on: promote on held-out series only",
                source=data.series,
            )
        return f"none with the recorded split ({overlap.of} series checked)", []
    if _same_manifest(client, cand, data):
        raise DataError(
            f"{label} was trained on this very manifest: promote on held-out series only",
            source=data.series,
        )
    return "not checked: no split recorded", [
        f"{label}'s run recorded no {tracking.SPLIT_ARTIFACT}: whether these series are held out "
        "could not be checked"
    ]


def _check_champion_overlap(
    client: Any, champ: Any, data: evaluate.EvalData
) -> tuple[str, list[str]]:
    """The champion's side of ``_check_overlap``; returns (tag, warnings).

    The champion is not refused: it is the incumbent, and series it trained on only inflate its
    numbers (the gate then errs towards keeping it). The outcome says so, with how many series.

    Raises:
        ModelLoadError, DataError: its split exists but cannot be read, or its run cannot be.
    """
    label = f"champion {champ.name} v{champ.version}"
    skewed = (
        "its numbers on these series are inflated, the comparison skewed against the challenger"
    )
    overlap = _recorded_overlap(client, champ, data)
    if overlap is not None:
        if overlap.series:
            return f"{overlap.describe()} in its recorded split", [
                f"{overlap.describe()} share images with the series {label} was trained or "
                f"validated on: {skewed}"
            ]
        return f"none with the recorded split ({overlap.of} series checked)", []
    if _same_manifest(client, champ, data):
        return f"all {data.rows['series_id'].nunique()} series: trained on this manifest", [
            f"{label} was trained on this very manifest: {skewed}"
        ]
    return "not checked: no split recorded", []


def promote(
    client: Any,
    cfg: PromoteConfig,
    data: evaluate.EvalData,
    champion_data: evaluate.EvalData | None = None,
) -> dict[str, Any]:
    """Evaluate the candidate (and @champion, if any) on ``data`` and apply ``decide``.

    ``champion_data`` is the same manifest joined to the champion's own table, where the
    challenger's embedding spec is not the champion's (a move to another CLIP): each is scored
    on its own table, over the series complete in both (``evaluate.common_series``).

    Returns:
        The outcome: ``decision`` (promoted, rejected, or unchanged when the candidate already is
        the champion), ``reason``, the versions, metrics, interval and table.

    Raises:
        ConfigError: no such registered model or version, no @challenger, a rolled-back version.
        DataError: the promotion series overlap the candidate's training split.
        ModelLoadError: a version, or a recorded split, cannot be loaded.
        KeeperError: a version's embedding spec is not the table's, or @champion moved while the
            two were evaluated (nothing is moved or tagged then).
    """
    from mlflow.exceptions import MlflowException

    name = cfg.name
    aliases = tracking.aliases(client, name)
    chal_v, mv = _candidate(client, cfg, aliases)
    champ_v = aliases.get(tracking.CHAMPION)
    out: dict[str, Any] = {"name": name, "challenger": chal_v, "champion": champ_v}
    if chal_v == champ_v:
        return {**out, "decision": "unchanged", "reason": f"v{chal_v} already is the champion"}
    unread: list[str] = []
    if champion_data is not None and champ_v is None:
        unread.append(f"no champion to score on {champion_data.embeddings}: it was not read")
        champion_data = None
    elif champion_data is not None:
        data, champion_data = evaluate.common_series(data, champion_data)
    overlap_tag, warnings = _check_overlap(client, mv, data)
    warnings = unread + warnings
    champion_overlap: str | None = None
    if champ_v is not None:
        try:
            champ_mv = client.get_model_version(name, champ_v)
        except MlflowException as e:
            raise ConfigError(f"{name} @champion is v{champ_v}, which is gone: {e.message}") from e
        champion_overlap, more = _check_champion_overlap(client, champ_mv, data)
        warnings += more

    challenger = evaluate.load_model(client, f"models:/{name}/{chal_v}")
    preds = {f"challenger v{chal_v}": evaluate.predict(challenger, data)}
    if champ_v is not None:
        champion = evaluate.load_model(client, f"models:/{name}/{champ_v}")
        preds[f"champion v{champ_v}"] = evaluate.predict(champion, champion_data or data)
    comparison = evaluate.compare(data, preds)
    if data.dropped:
        warnings.append(
            f"{data.dropped} of {data.dropped + len(comparison.series)} promotion series left "
            f"out: an image of each has no embedding in {data.embeddings}"
            + (f" or {champion_data.embeddings}" if champion_data is not None else "")
        )
    m_chal = comparison.results[f"challenger v{chal_v}"]
    m_champ = comparison.results.get(f"champion v{champ_v}")

    def ranks(label: str) -> np.ndarray:
        score = preds[label]["score"].to_numpy(dtype=np.float64)
        return best_ranks([score[g.index.to_numpy()] for g in comparison.series], comparison.best)

    gain = top1_gain(
        ranks(f"challenger v{chal_v}"),
        ranks(f"champion v{champ_v}") if champ_v is not None else None,
        [len(g) for g in comparison.series],
        cfg.confidence,
    )
    decision = decide(m_chal, m_champ, cfg.min_gain, gain if cfg.ci_gate else None)
    online: VersionAB | None = None
    if cfg.online is not None:
        online = version_ab(
            *ab_report.load(cfg.online),
            challenger=served_as(name, chal_v),
            champion=served_as(name, champ_v) if champ_v is not None else None,
            confidence=cfg.confidence,
        )
        live = decide_online(online, cfg.min_online_gain)
        decision = Decision(decision.promote and live.promote, f"{decision.reason}; {live.reason}")

    tags = {
        "decision": "promoted" if decision.promote else "rejected",
        "reason": decision.reason,
        "timestamp": _now(),
        "min_gain": str(cfg.min_gain),
        "ci_gate": str(cfg.ci_gate).lower(),
        "series": data.series,
        "n_series": str(m_chal.n_series),
        "series_dropped": str(data.dropped),
        "champion_embeddings": champion_data.embeddings if champion_data else data.embeddings,
        "challenger_top1": f"{m_chal.top1:.6f}",
        "challenger_mrr": f"{m_chal.mrr:.6f}",
        "random_top1": f"{m_chal.random_top1:.6f}",
        "champion_version": champ_v or "none",
        "gain_vs": "champion" if champ_v is not None else "random",
        "gain_top1": f"{gain.estimate:.6f}",
        "gain_ci_low": f"{gain.low:.6f}",
        "gain_ci_high": f"{gain.high:.6f}",
        "gain_ci_confidence": f"{gain.confidence:g}",
        "overlap": overlap_tag,
    }
    if cfg.force:
        tags["forced_after_rollback"] = "true"
    if online is not None:
        tags |= {"online": str(cfg.online), "min_online_gain": str(cfg.min_online_gain)}
        if online.since is not None:
            tags["online_since"] = online.since.isoformat()
        if (online_gain := online.report.gain) is not None:
            tags |= {
                "online_gain_top1": f"{online_gain.estimate:.6f}",
                "online_gain_ci_low": f"{online_gain.low:.6f}",
                "online_gain_ci_high": f"{online_gain.high:.6f}",
                "online_groups": str(online_gain.n),
            }
    if m_champ is not None:
        tags |= {"champion_top1": f"{m_champ.top1:.6f}", "champion_mrr": f"{m_champ.mrr:.6f}"}
    if champion_overlap is not None:
        tags["champion_overlap"] = champion_overlap
    if warnings:
        tags["warnings"] = "; ".join(warnings)
    # The versions were judged against the champion read at the start: if another promote or a
    # rollback has moved it since, neither the aliases nor this version's record may be written.
    now = tracking.aliases(client, name).get(tracking.CHAMPION)
    if now != champ_v:
        was = f"v{champ_v}" if champ_v is not None else "none"
        to = f"v{now}" if now is not None else "none"
        raise KeeperError(
            f"{name} @{tracking.CHAMPION} moved from {was} to {to} during this promotion; "
            "run it again"
        )
    if decision.promote:
        if champ_v is not None:
            client.set_registered_model_alias(name, tracking.PREVIOUS_CHAMPION, champ_v)
            tags["previous_champion"] = champ_v
        client.set_registered_model_alias(name, tracking.CHAMPION, chal_v)
    for key, value in tags.items():
        client.set_model_version_tag(name, chal_v, TAG + key, value)
    return {
        **out,
        "decision": tags["decision"],
        "reason": decision.reason,
        "min_gain": cfg.min_gain,
        "gain": asdict(gain),
        "gain_vs": tags["gain_vs"],
        "series_scored": len(comparison.series),
        "series_dropped": data.dropped,
        "warnings": warnings,
        "champion_overlap": champion_overlap,
        "metrics": {k: v.as_dict() for k, v in comparison.results.items()},
        "table": comparison.table(),
        "online": online.as_dict() if online is not None else None,
    }


def rollback(client: Any, name: str) -> dict[str, Any]:
    """Move @champion back to @previous-champion, recording ``keeper.rollback.*`` tags.

    The version restored becomes the champion; @previous-champion then points to the champion
    that one had replaced (its ``keeper.promotion.previous_champion`` tag), or, where that one
    is retired (rolled back, and not promoted since), the one before it, and so on; or is
    removed. A version promoted twice (``--version N``) makes the tags a loop: the walk stops
    at a version it has seen, so no rollback restores a version an earlier one retired. The
    version taken out of service is tagged ``keeper.rollback.rolled_back_at/_to`` and loses
    @challenger if it held it, so no later ``keeper promote`` puts it back unasked.

    Raises:
        ConfigError: no such registered model, no previous champion to go back to, or the
            previous champion is the champion itself (nothing is moved or tagged).
    """
    aliases = tracking.aliases(client, name)
    prev, current = aliases.get(tracking.PREVIOUS_CHAMPION), aliases.get(tracking.CHAMPION)
    if prev is None:
        raise ConfigError(
            f"{name} has no previous champion to roll back to (alias "
            f"@{tracking.PREVIOUS_CHAMPION} is set only when keeper promote replaces a champion)"
        )
    if prev == current:
        raise ConfigError(
            f"{name} @{tracking.PREVIOUS_CHAMPION} is v{prev}, which already is "
            f"@{tracking.CHAMPION}: there is nothing to roll back to (point "
            f"@{tracking.PREVIOUS_CHAMPION} at the version to restore, or delete it)"
        )
    ts = _now()
    client.set_registered_model_alias(name, tracking.CHAMPION, prev)
    client.set_model_version_tag(name, prev, ROLLBACK_TAG + "restored_at", ts)
    client.set_model_version_tag(name, prev, ROLLBACK_TAG + "restored_from", current or "none")
    challenger_removed = False
    if current is not None:
        client.set_model_version_tag(name, current, ROLLBACK_TAG + "rolled_back_at", ts)
        client.set_model_version_tag(name, current, ROLLBACK_TAG + "rolled_back_to", prev)
        if aliases.get(tracking.CHALLENGER) == current:
            client.delete_registered_model_alias(name, tracking.CHALLENGER)
            challenger_removed = True
    earlier = _earlier_champion(client, name, prev, current)
    if earlier is not None:
        client.set_registered_model_alias(name, tracking.PREVIOUS_CHAMPION, earlier)
    else:
        client.delete_registered_model_alias(name, tracking.PREVIOUS_CHAMPION)
    return {
        "name": name,
        "decision": "rolled-back",
        "champion": prev,
        "replaced": current,
        "previous_champion": earlier,
        "challenger_removed": challenger_removed,
    }


def run(cfg: PromoteConfig) -> dict[str, Any]:
    """Promote (or roll back) as ``cfg`` says; returns the outcome (``format_outcome`` prints it).

    Raises:
        KeeperError: refused (see ``promote`` and ``rollback``), or the data cannot be read.
    """
    import mlflow

    # The data first: a wrong path fails before any registry is touched.
    data = None if cfg.rollback else evaluate.load_data(str(cfg.embeddings), str(cfg.series))
    theirs = None
    if data is not None and cfg.champion_embeddings:
        theirs = evaluate.load_data(cfg.champion_embeddings, str(cfg.series))
    uri = tracking.tracking_uri(cfg.tracking_uri, cfg.data_dir)
    registry.use_tracking_store(uri)  # models:/ URIs resolve against the global tracking URI
    client = mlflow.MlflowClient(uri)
    result = rollback(client, cfg.name) if data is None else promote(client, cfg, data, theirs)
    result["tracking_uri"] = uri
    if cfg.json_out:
        storage.write_bytes(cfg.json_out, json.dumps(result, indent=2).encode())
    return result


def exit_status(result: Mapping[str, Any], *, exit_code: bool) -> int:
    """The process's exit status: 0, or with ``exit_code`` EXIT_REJECTED for a rejection
    (promoted, unchanged and rolled back are 0: ``@champion`` is where it should be)."""
    return EXIT_REJECTED if exit_code and result["decision"] == "rejected" else 0


def format_outcome(result: Mapping[str, Any]) -> str:
    """What ``keeper promote`` prints: the table, any warning, and the verdict line."""
    name = result["name"]
    if result["decision"] == "rolled-back":
        was = f"v{result['replaced']}" if result["replaced"] else "none"
        line = f"rolled back {name}: @champion {was} -> v{result['champion']}"
        if result["challenger_removed"]:
            line += f" ({was} is no longer @{tracking.CHALLENGER})"
        return line
    lines = [result["table"]] if "table" in result else []
    lines += [f"WARNING: {w}" for w in result.get("warnings", [])]
    verdict = {"promoted": "PROMOTED", "rejected": "REJECTED"}.get(result["decision"], "NO-OP")
    was = f"v{result['champion']}" if result["champion"] else "none"
    lines.append(
        f"{verdict} {name} v{result['challenger']} (champion was {was}): {result['reason']}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.promote ARGS`` is ``keeper promote ARGS``."""
    from keeper_core.cli import main as keeper

    return keeper(["promote", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
