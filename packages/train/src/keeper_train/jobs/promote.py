"""Gate a registered ranker: move @champion to @challenger only if it is measurably better.

    python -m keeper_train.jobs.promote keeper-ranker --embeddings keeper-demo/embeddings/keeper-tiny_random \
        --series keeper-demo/corpus/manifest.csv --min-gain 0.01
    keeper promote keeper-ranker --embeddings ... --series ...
    keeper promote keeper-ranker --rollback

Both versions are evaluated on the same series (jobs.evaluate), the table is printed, and ``decide``
applies the rule: top-1 must gain at least ``--min-gain`` (absolute, 0.01 = 1 point) and MRR must
not regress; with no champion yet, a challenger is promoted if its top-1 beats random. The
decision and both versions' numbers are recorded as ``keeper.promotion.*`` tags on the challenger
version. The replaced champion is kept as alias ``previous-champion`` (and as the new champion's
``keeper.promotion.previous_champion`` tag, so rollbacks can walk back more than one step).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keeper_core import storage
from keeper_core.errors import ConfigError, DataError, KeeperError
from keeper_core.metrics import SeriesMetrics
from keeper_train import tracking
from keeper_train.commands import add_promote_arguments
from keeper_train.jobs import evaluate

TAG = "keeper.promotion."
# top-1 and MRR are ratios of small integers: a gain of exactly min_gain must not be lost to
# float rounding (0.3 - 0.29 < 0.01 in floating point).
_EPS = 1e-9


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


def decide(challenger: SeriesMetrics, champion: SeriesMetrics | None, min_gain: float) -> Decision:
    """The promotion rule, on metrics of the same series.

    With a champion: promote iff ``challenger.top1 - champion.top1 >= min_gain`` and
    ``challenger.mrr >= champion.mrr``. Without one: promote iff the challenger's top-1 beats the
    random baseline (mean 1/len(series)).

    Raises:
        ConfigError: min_gain outside [-1, 1].
        DataError: the two were measured on different numbers of series.
    """
    check_min_gain(min_gain)
    if champion is None:
        vs = f"top-1 {_pct(challenger.top1)} vs random {_pct(challenger.random_top1)}"
        if challenger.top1 > challenger.random_top1 + _EPS:
            return Decision(True, f"no champion yet; {vs}: beats random")
        return Decision(False, f"no champion yet; {vs}: does not beat random")
    if champion.n_series != challenger.n_series:
        raise DataError(
            f"challenger and champion measured on {challenger.n_series} and "
            f"{champion.n_series} series: compare them on the same series"
        )
    gain = challenger.top1 - champion.top1
    mrr = f"MRR {champion.mrr:.3f} -> {challenger.mrr:.3f}"
    top1 = f"top-1 {_pct(champion.top1)} -> {_pct(challenger.top1)} ({100 * gain:+.1f} pts"
    problems = []
    if gain < min_gain - _EPS:
        problems.append(f"{top1}, below the {100 * min_gain:+.1f} required)")
    if challenger.mrr < champion.mrr - _EPS:
        problems.append(f"{mrr} regressed")
    if problems:
        return Decision(False, "; ".join(problems))
    return Decision(True, f"{top1}, >= {100 * min_gain:+.1f} required); {mrr}")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def promote(
    client: Any, name: str, data: evaluate.EvalData, min_gain: float = 0.01
) -> dict[str, Any]:
    """Evaluate @challenger (and @champion, if any) on ``data`` and apply ``decide``.

    Returns:
        The outcome: ``decision`` (promoted, rejected, or unchanged when the challenger already is
        the champion), ``reason``, the versions, metrics and table.

    Raises:
        ConfigError: no such registered model, or it has no @challenger.
        KeeperError: a version cannot be loaded, or its embedding spec is not the table's.
    """
    check_min_gain(min_gain)
    aliases = tracking.aliases(client, name)
    chal_v, champ_v = aliases.get(tracking.CHALLENGER), aliases.get(tracking.CHAMPION)
    if chal_v is None:
        raise ConfigError(
            f"{name} has no @{tracking.CHALLENGER} version (train-head --register sets it)"
        )
    out: dict[str, Any] = {"name": name, "challenger": chal_v, "champion": champ_v}
    if chal_v == champ_v:
        return {**out, "decision": "unchanged", "reason": f"v{chal_v} already is the champion"}

    challenger = evaluate.load_model(client, f"models:/{name}/{chal_v}")
    preds = {f"challenger v{chal_v}": evaluate.predict(challenger, data)}
    if champ_v is not None:
        champion = evaluate.load_model(client, f"models:/{name}/{champ_v}")
        preds[f"champion v{champ_v}"] = evaluate.predict(champion, data)
    comparison = evaluate.compare(data, preds)
    m_chal = comparison.results[f"challenger v{chal_v}"]
    m_champ = comparison.results.get(f"champion v{champ_v}")
    decision = decide(m_chal, m_champ, min_gain)

    tags = {
        "decision": "promoted" if decision.promote else "rejected",
        "reason": decision.reason,
        "timestamp": _now(),
        "min_gain": str(min_gain),
        "series": data.series,
        "n_series": str(m_chal.n_series),
        "challenger_top1": f"{m_chal.top1:.6f}",
        "challenger_mrr": f"{m_chal.mrr:.6f}",
        "random_top1": f"{m_chal.random_top1:.6f}",
        "champion_version": champ_v or "none",
    }
    if m_champ is not None:
        tags |= {"champion_top1": f"{m_champ.top1:.6f}", "champion_mrr": f"{m_champ.mrr:.6f}"}
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
        "min_gain": min_gain,
        "series_scored": len(comparison.series),
        "metrics": {k: v.as_dict() for k, v in comparison.results.items()},
        "table": comparison.table(),
    }


def rollback(client: Any, name: str) -> dict[str, Any]:
    """Move @champion back to @previous-champion, recording ``keeper.rollback.*`` tags.

    The version restored becomes the champion; @previous-champion then points to the champion
    that one had replaced (its ``keeper.promotion.previous_champion`` tag), or is removed.

    Raises:
        ConfigError: no such registered model, or no previous champion to go back to.
    """
    aliases = tracking.aliases(client, name)
    prev, current = aliases.get(tracking.PREVIOUS_CHAMPION), aliases.get(tracking.CHAMPION)
    if prev is None:
        raise ConfigError(
            f"{name} has no previous champion to roll back to (alias "
            f"@{tracking.PREVIOUS_CHAMPION} is set only when keeper promote replaces a champion)"
        )
    ts = _now()
    client.set_registered_model_alias(name, tracking.CHAMPION, prev)
    client.set_model_version_tag(name, prev, "keeper.rollback.restored_at", ts)
    client.set_model_version_tag(name, prev, "keeper.rollback.restored_from", current or "none")
    if current is not None:
        client.set_model_version_tag(name, current, "keeper.rollback.rolled_back_at", ts)
        client.set_model_version_tag(name, current, "keeper.rollback.rolled_back_to", prev)
    earlier = client.get_model_version(name, prev).tags.get(TAG + "previous_champion")
    if earlier and earlier != current:
        client.set_registered_model_alias(name, tracking.PREVIOUS_CHAMPION, earlier)
    else:
        client.delete_registered_model_alias(name, tracking.PREVIOUS_CHAMPION)
        earlier = None
    return {
        "name": name,
        "decision": "rolled-back",
        "champion": prev,
        "replaced": current,
        "previous_champion": earlier,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``keeper promote NAME ...`` (or ``--rollback``); prints and returns the outcome."""
    import mlflow

    check_min_gain(args.min_gain)
    if not args.rollback and not (args.embeddings and args.series):
        raise ConfigError("--embeddings and --series are required (except with --rollback)")
    uri = tracking.tracking_uri(args.tracking_uri, args.data_dir)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    if args.rollback:
        result = rollback(client, args.name)
        was = f"v{result['replaced']}" if result["replaced"] else "none"
        print(f"rolled back {args.name}: @champion {was} -> v{result['champion']}")
    else:
        data = evaluate.load_data(args.embeddings, args.series)
        result = promote(client, args.name, data, args.min_gain)
        if "table" in result:
            print(result["table"])
        verdict = {"promoted": "PROMOTED", "rejected": "REJECTED"}.get(result["decision"], "NO-OP")
        was = f"v{result['champion']}" if result["champion"] else "none"
        print(
            f"{verdict} {args.name} v{result['challenger']} (champion was {was}): {result['reason']}"
        )
    result["tracking_uri"] = uri
    if args.json:
        storage.write_bytes(args.json, json.dumps(result, indent=2).encode())
    return result


def run_cli(args: argparse.Namespace) -> int:
    """``run`` with keeper's exit codes: 0 decided (promoted or not), 2 refused."""
    try:
        run(args)
    except KeeperError as e:
        print(f"keeper promote: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.promote NAME --embeddings DIR --series MANIFEST``."""
    parser = argparse.ArgumentParser(
        prog="python -m keeper_train.jobs.promote", description=__doc__.split("\n")[0]
    )
    add_promote_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    from keeper_train.jobs import promote as job

    sys.exit(job.main())
