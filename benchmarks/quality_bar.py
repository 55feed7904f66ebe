"""Series-ranking quality: trained heads against the sharpness rule and random.

    .venv/bin/python benchmarks/quality_bar.py [--series 660] [--seeds 0,1,2] [--tune] \
        [--ray-job] [--out benchmarks/results/quality_bar.json]

Data: ``--series`` burst-like series at 320x240 from all 17 scikit-image photos
(``keeper_core.synthetic`` with ``photos=PHOTOS``), embedded once by ``keeper embed``'s job
(``keeper-tiny:random``, local Ray) into ``--cache``.

Two splits. Every head is trained by ``train_head.train_single_process`` (the Ray job's recipe in
one process: same head, loss, batches, early stopping on val top-1), once per ``--seeds`` value:

- ``series``: hash split by series, 0.7 / 0.15 / 0.15 (``split_by=series_id``). Every base photo
  is in train, val and test: it measures ranking new bursts of scenes the head has seen.
- ``photo``: by base photo, as cross-validation. The 17 photos are dealt into 4 groups; outer
  fold k tests group k, validates (early stopping) on 3 photos of group k+1 and trains on the
  other 9-10 photos (``split_by=base_photo`` with ``val_groups`` and ``test_groups``). Each photo
  is test once, so a seed's figures pool all 660 series; per-fold figures are in the JSON.

Rows: MLP and series transformer on embedding+quality, MLP on the embedding only and on the
quality features only (mean +- sample std over seeds), then the untrained rules: sharpness (the
highest log Laplacian variance), aesthetic prompts (``keeper_core.scoring`` on the same
embeddings, as ``train_head.baseline_metrics``) and the random ranker's expected value.

Hyper-parameters never see the series they are tested on. ``--tune`` picks each row's grid point
by val top-1 (seed 0), separately for every outer fold: on the series split from its val series;
on the photo split by nested cross-validation inside the outer fold's 12-13 non-test photos (3
inner folds, each validating on 3 photos of another group and training on the rest; the outer
fold's test photos are in no inner fold's train or val). The choices are printed and recorded
(benchmarks/results/quality_bar_tuning.json); ``CHOSEN`` and ``CHOSEN_PHOTO`` hold them for runs
without ``--tune``. Every run uses one torch thread, so the figures repeat exactly on the same
machine. ``--ray-job`` also runs one real ``train_head.run`` (Ray Train, 1 worker, MLflow in a
sqlite file under --cache, baselines on) of the chosen MLP on the series split, seed 0: with one
worker it follows the same recipe, so it should match the MLP's seed-0 test figures.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

# benchmarks/ is sys.path[0] when this runs as a script: embed.py's machine description.
from embed import machine_info, write_record

from keeper_core.heads import HeadConfig
from keeper_core.metrics import SeriesMetrics, series_metrics
from keeper_core.ranker import QUALITY_INPUTS
from keeper_core.synthetic import PHOTOS, generate_corpus
from keeper_core.training import Series, batches
from keeper_train.jobs import embed, train_head
from keeper_train.jobs.train_head import Prepared, TrainHeadConfig

MODEL = "keeper-tiny:random"
SIZE = (320, 240)
N_FOLDS, N_VAL_PHOTOS = 4, 3
#: The rows that train a head: name -> (head, features).
HEADS: dict[str, tuple[str, str]] = {
    "MLP, embedding+quality": ("mlp", "embedding+quality"),
    "transformer, embedding+quality": ("transformer", "embedding+quality"),
    "MLP, embedding only": ("mlp", "embedding"),
    "MLP, quality only": ("mlp", "quality"),
}
MAIN = "MLP, embedding+quality"
#: Every run: up to 80 epochs, the best val top-1 epoch kept, stop after 20 without a gain.
COMMON: dict[str, Any] = {"epochs": 80, "patience": 20}
Choice = dict[str, dict[str, Any]]  # row -> the grid point chosen for it
#: What ``--tune`` searches. Nested selection trains every grid point 13 times (1 series fold +
#: 4 outer x 3 inner photo folds), so the grid is kept small (``--tune`` took 24 minutes on 2
#: shared cores): dropout (0.1), batch_size (32), weight_decay (1e-4) and the transformer's
#: layers (2) stay at the job's defaults.
GRID: dict[str, dict[str, list[Any]]] = {
    "mlp": {"hidden": [32, 64, 256], "layers": [1, 2], "lr": [1e-3, 3e-3]},
    "transformer": {"hidden": [32, 64], "lr": [3e-4, 1e-3]},
}
SELECTION = (
    "per outer fold and row, the grid point with the best mean val top-1 (seed 0): series split "
    "on its val series; photo split on 3 inner folds of the outer fold's non-test photos"
)
#: The choices of the last ``--tune`` (benchmarks/results/quality_bar_tuning.json): the series
#: split's, and each photo fold's.
CHOSEN: Choice = {
    "MLP, embedding+quality": {"hidden": 256, "layers": 2, "lr": 0.003},
    "transformer, embedding+quality": {"hidden": 32, "lr": 0.0003},
    "MLP, embedding only": {"hidden": 32, "layers": 1, "lr": 0.003},
    "MLP, quality only": {"hidden": 32, "layers": 2, "lr": 0.003},
}  # fmt: skip
CHOSEN_PHOTO: list[Choice] = [
    {
        "MLP, embedding+quality": {"hidden": 32, "layers": 1, "lr": 0.003},
        "transformer, embedding+quality": {"hidden": 32, "lr": 0.001},
        "MLP, embedding only": {"hidden": 32, "layers": 2, "lr": 0.003},
        "MLP, quality only": {"hidden": 64, "layers": 1, "lr": 0.003},
    },
    {
        "MLP, embedding+quality": {"hidden": 32, "layers": 2, "lr": 0.003},
        "transformer, embedding+quality": {"hidden": 32, "lr": 0.001},
        "MLP, embedding only": {"hidden": 256, "layers": 2, "lr": 0.003},
        "MLP, quality only": {"hidden": 256, "layers": 1, "lr": 0.003},
    },
    {
        "MLP, embedding+quality": {"hidden": 64, "layers": 2, "lr": 0.001},
        "transformer, embedding+quality": {"hidden": 32, "lr": 0.0003},
        "MLP, embedding only": {"hidden": 256, "layers": 2, "lr": 0.003},
        "MLP, quality only": {"hidden": 64, "layers": 1, "lr": 0.003},
    },
    {
        "MLP, embedding+quality": {"hidden": 64, "layers": 2, "lr": 0.003},
        "transformer, embedding+quality": {"hidden": 32, "lr": 0.001},
        "MLP, embedding only": {"hidden": 64, "layers": 2, "lr": 0.003},
        "MLP, quality only": {"hidden": 256, "layers": 1, "lr": 0.003},
    },
]  # fmt: skip
HP_KEYS = ("hidden", "layers", "heads", "dropout", "lr", "weight_decay", "batch_size")


# --------------------------------------------------------------------------------------------
# Data and splits


def make_data(cache: Path, n_series: int, seed: int) -> tuple[str, str]:
    """Corpus and embedding table, made once under ``cache``; returns (embeddings, manifest)."""
    corpus = cache / f"corpus-all-{SIZE[0]}x{SIZE[1]}-seed{seed}-n{n_series}"
    manifest = corpus / "manifest.csv"  # written last: its presence means the corpus is whole
    if not manifest.exists():
        print(f"generating {n_series} series into {corpus} ...", flush=True)
        generate_corpus(corpus, n_series=n_series, seed=seed, image_size=SIZE, photos=PHOTOS)
    out = cache / f"emb-{corpus.name}-{MODEL.replace(':', '_')}"
    # The job resumes: on a finished table it finds nothing to do.
    summary = embed.run(embed.EmbedConfig(input=str(manifest), output=str(out), model=MODEL))
    if summary.counts.failed:
        raise SystemExit(f"embedding failed: {summary.counts}")
    return str(out), str(manifest)


def photo_groups() -> list[list[str]]:
    """The photos dealt into ``N_FOLDS`` groups; outer fold k tests group k."""
    order = [PHOTOS[i] for i in np.random.default_rng(0).permutation(len(PHOTOS))]
    return [order[k::N_FOLDS] for k in range(N_FOLDS)]


def photo_folds() -> list[tuple[list[str], list[str]]]:
    """(val photos, test photos) per outer fold; every photo is test exactly once."""
    g = photo_groups()
    return [(g[(k + 1) % N_FOLDS][:N_VAL_PHOTOS], g[k]) for k in range(N_FOLDS)]


def inner_folds(k: int) -> list[tuple[list[str], list[str]]]:
    """(val photos, held-out photos) of the inner folds that choose outer fold k's settings.

    Each validates on 3 photos of another group and trains on the rest of the non-test photos.
    Outer fold k's test photos go to the inner fold's test split only to keep them out of its
    train and val: tuning reads val alone.
    """
    g = photo_groups()
    return [(g[j][:N_VAL_PHOTOS], g[k]) for j in range(N_FOLDS) if j != k]


def split_fields(emb: str, manifest: str) -> dict[str, list[dict[str, Any]]]:
    """Split name -> the TrainHeadConfig fields of each of its folds."""
    base = {"embeddings": emb, "series": manifest}
    series = [{**base, "split_by": "series_id", "split_fractions": (0.7, 0.15, 0.15), "seed": 0}]
    photo = [
        {**base, "split_by": "base_photo", "val_groups": val, "test_groups": test}
        for val, test in photo_folds()
    ]
    return {"series": series, "photo": photo}


def tuning_folds(
    emb: str, manifest: str, outer: dict[str, list[Fold]]
) -> dict[str, list[list[Fold]]]:
    """Split name -> per outer fold, the folds whose val top-1 chooses its settings.

    The series split tunes on its own val series (its test series are never read); the photo
    split on ``inner_folds``.
    """
    base = {"embeddings": emb, "series": manifest, "split_by": "base_photo"}
    photo = [
        [Fold({**base, "val_groups": val, "test_groups": held}) for val, held in inner_folds(k)]
        for k in range(N_FOLDS)
    ]
    return {"series": [[f] for f in outer["series"]], "photo": photo}


class Fold:
    """One train/val/test split, prepared once per feature set."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self._prepared: dict[str, Prepared] = {}

    def prepared(self, row: str, hp: dict[str, Any]) -> Prepared:
        """The data for ``row`` with its head config sized by ``hp`` (validated)."""
        kind, features = HEADS[row]
        if features not in self._prepared:
            cfg = TrainHeadConfig.model_validate({**self.fields, "features": features})
            self._prepared[features] = train_head.prepare(cfg)
        p = self._prepared[features]
        rc = p.ranker_config
        sizes = {k: hp[k] for k in ("hidden", "layers", "heads", "dropout") if k in hp}
        head = HeadConfig.model_validate({**rc.head.model_dump(), "kind": kind, **sizes})
        return p.model_copy(update={"ranker_config": rc.model_copy(update={"head": head})})

    @property
    def table(self) -> pd.DataFrame:
        return next(iter(self._prepared.values())).table

    def best(self, split: str) -> list[int]:
        return [b for _, b in next(iter(self._prepared.values())).splits[split]]

    def rows(self, split: str) -> list[np.ndarray]:
        return next(iter(self._prepared.values())).rows[split]

    def series_ids(self, *splits: str) -> set[str]:
        """The ids of the series in ``splits`` of this fold."""
        t = self.prepared(MAIN, {}).table
        return set(t.loc[t["split"].isin(splits), "series_id"].astype(str))


def check_nested(outer: Fold, tuning: list[Fold]) -> None:
    """Refuse to tune on series that the outer fold tests on (in train or in val)."""
    test = outer.series_ids("test")
    for f in tuning:
        if seen := test & f.series_ids("train", "val"):
            raise SystemExit(f"tuning fold {f.fields} sees {len(seen)} of the outer test series")


# --------------------------------------------------------------------------------------------
# Training and scoring


@torch.inference_mode()
def head_scores(model: torch.nn.Module, data: list[Series]) -> list[np.ndarray]:
    """Per-series scores, exactly as ``training.evaluate`` computes them."""
    model.eval()
    out: list[np.ndarray] = []
    for x, mask, _ in batches(data, 256):
        s = model(x, mask).float().numpy()
        out += [s[j, : int(mask[j].sum())] for j in range(len(x))]
    return out


def train(
    fold: Fold, row: str, hp: dict[str, Any], seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One ``train_single_process`` run; the trained head's (val, test) scores per series."""
    kind, features = HEADS[row]
    cfg = TrainHeadConfig.model_validate(
        {**fold.fields, **COMMON, **hp, "head": kind, "features": features, "seed": seed}
    )
    p = fold.prepared(row, hp)
    model, test = train_head.train_single_process(p, cfg, cfg.loss)
    val_s, test_s = head_scores(model, p.splits["val"]), head_scores(model, p.splits["test"])
    assert series_metrics(test_s, fold.best("test")) == test  # the same numbers as the job's
    return val_s, test_s


def pooled(scores: list[list[np.ndarray]], bests: list[list[int]]) -> SeriesMetrics:
    """Metrics over the union of several folds' test series."""
    return series_metrics([s for f in scores for s in f], [b for f in bests for b in f])


def rule_scores(fold: Fold) -> dict[str, list[np.ndarray]]:
    """Test scores of the untrained rules: sharpness, and aesthetic prompts on the embeddings."""
    from keeper_core.embedding import ClipEmbedder
    from keeper_core.scoring import AestheticConfig, aesthetic_scores

    table, rows = fold.table, fold.rows("test")
    sharp = table["sharpness"].to_numpy(dtype=np.float64)
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in table["embedding"]])
    config = AestheticConfig.default()
    prompts = ClipEmbedder(MODEL).prompt_embeddings(config.all_prompts())
    aes = aesthetic_scores(emb, prompts, config).total
    return {"sharpness rule": [sharp[r] for r in rows], "aesthetic prompts": [aes[r] for r in rows]}


# --------------------------------------------------------------------------------------------
# Tuning (val only)


def grid(kind: str) -> list[dict[str, Any]]:
    keys, values = list(GRID[kind]), list(GRID[kind].values())
    return [dict(zip(keys, v, strict=True)) for v in itertools.product(*values)]


def tune(
    outer: dict[str, list[Fold]], tuning: dict[str, list[list[Fold]]]
) -> tuple[dict[str, list[Choice]], list[dict[str, Any]]]:
    """Per split, outer fold and row, the grid point with the best mean val top-1 (seed 0).

    The mean is over that outer fold's tuning folds (``tuning_folds``), never its test series.
    Returns the choices (split -> one ``Choice`` per outer fold) and every grid point's scores.
    """
    log: list[dict[str, Any]] = []
    chosen: dict[str, list[Choice]] = {}
    for split, folds in outer.items():
        chosen[split] = []
        for k, (fold, inner) in enumerate(zip(folds, tuning[split], strict=True)):
            check_nested(fold, inner)
            choice: Choice = {}
            for row, (kind, _) in HEADS.items():
                best_score, best_hp = -1.0, {}
                t0 = time.perf_counter()
                for hp in grid(kind):
                    vals = []
                    for f in inner:
                        v, _ = train(f, row, hp, 0)  # the inner fold's test is never scored
                        vals.append(round(series_metrics(v, f.best("val")).top1, 4))
                    score = float(np.mean(vals))
                    log.append(
                        {"split": split, "fold": k, "row": row, **hp,
                         "val_top1": round(score, 4), "per_inner_fold": vals}
                    )  # fmt: skip
                    if score > best_score:  # ties keep the earlier, smaller point
                        best_score, best_hp = score, hp
                choice[row] = best_hp
                print(
                    f"  tune {split} fold {k} {row}: {best_hp} val top1 {100 * best_score:.1f} "
                    f"({time.perf_counter() - t0:.0f}s)",
                    flush=True,
                )
            chosen[split].append(choice)
    return chosen, log


# --------------------------------------------------------------------------------------------
# Analysis: what the rankers get right and wrong


def keeper_beats(table: pd.DataFrame, rows: list[np.ndarray], scores: list[np.ndarray]) -> dict:
    """Per degradation kind: (keeper wins, shots) for every degraded shot carrying that kind."""
    deg = table["degradation"].astype(str).to_numpy()
    is_best = table["is_best"].to_numpy().astype(bool)
    out: dict[str, list[int]] = {}
    for r, s in zip(rows, scores, strict=True):
        k = int(np.flatnonzero(is_best[r])[0])
        for j, label in enumerate(deg[r]):
            if j != k:
                for kind in {p.split(":")[0] for p in label.split("+")}:
                    tally = out.setdefault(kind, [0, 0])
                    tally[0] += int(s[j] < s[k])
                    tally[1] += 1
    return out


def feature_rules(folds: list[Fold]) -> dict[str, float]:
    """Pooled test top-1 of ranking by one quality feature, signed by its better direction."""
    out = {}
    for name in QUALITY_INPUTS:
        ups, downs, bests = [], [], []
        for fold in folds:
            col = fold.table[name].to_numpy(dtype=np.float64)
            ups.append([col[r] for r in fold.rows("test")])
            downs.append([-col[r] for r in fold.rows("test")])
            bests.append(fold.best("test"))
        up, down = pooled(ups, bests).top1, pooled(downs, bests).top1
        out[name if up >= down else f"-{name}"] = round(max(up, down), 4)
    return out


# --------------------------------------------------------------------------------------------
# One split


def summarize(ms: list[SeriesMetrics]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_series": ms[0].n_series}
    for k in ("top1", "top2", "top3", "mrr", "mean_rank"):
        v = np.array([getattr(m, k) for m in ms])
        out[k] = round(float(v.mean()), 4)
        out[f"{k}_std"] = round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4)
    out["per_seed_top1"] = [round(m.top1, 4) for m in ms]
    # Sampling error of top-1 from the finite test set (binomial), which the spread over seeds
    # does not show: every seed is scored on the same series.
    p = out["top1"]
    out["top1_test_se"] = round(float(np.sqrt(p * (1 - p) / ms[0].n_series)), 4)
    return out


def evaluate_split(
    name: str, folds: list[Fold], chosen: list[Choice], seeds: list[int]
) -> dict[str, Any]:
    head_scores_: dict[str, dict[int, list[list[np.ndarray]]]] = {
        row: {s: [] for s in seeds} for row in HEADS
    }
    fold_info: list[dict[str, Any]] = []
    for i, (fold, choice) in enumerate(zip(folds, chosen, strict=True)):
        info: dict[str, Any] = {
            "val_groups": fold.fields.get("val_groups"),
            "test_groups": fold.fields.get("test_groups"),
            "hyperparameters": choice,
            "test_top1": {},
        }
        for row in HEADS:
            for seed in seeds:
                t0 = time.perf_counter()
                _, test = train(fold, row, choice[row], seed)
                head_scores_[row][seed].append(test)
                top1 = series_metrics(test, fold.best("test")).top1
                info["test_top1"].setdefault(row, []).append(round(top1, 4))
                print(
                    f"  {name} fold {i} {row} seed {seed}: top1 {100 * top1:.1f} "
                    f"({time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )
        info["series"] = {k: len(v) for k, v in fold.prepared(MAIN, {}).splits.items()}
        fold_info.append(info)
    bests = [f.best("test") for f in folds]
    rules = [rule_scores(f) for f in folds]
    rows: dict[str, Any] = {
        row: summarize([pooled(head_scores_[row][s], bests) for s in seeds]) for row in HEADS
    }
    for rule in ("sharpness rule", "aesthetic prompts"):
        rows[rule] = summarize([pooled([r[rule] for r in rules], bests)])
        for info, r, b in zip(fold_info, rules, bests, strict=True):
            info["test_top1"][rule] = round(series_metrics(r[rule], b).top1, 4)
    m = pooled([r["sharpness rule"] for r in rules], bests)
    rows["random (expected)"] = {
        "n_series": m.n_series,
        **{k: round(getattr(m, f"random_{k}"), 4) for k in ("top1", "top2", "top3", "mrr")},
        **{f"{k}_std": 0.0 for k in ("top1", "top2", "top3", "mrr")},
        "mean_rank": round(m.random_mean_rank, 4),
    }
    for info, r in zip(fold_info, rules, strict=True):
        info["test_top1"]["random (expected)"] = round(
            float(np.mean([1 / len(s) for s in r["sharpness rule"]])), 4
        )

    # Which degradations each ranker lets beat the keeper (seed 0, all folds pooled).
    beats: dict[str, dict[str, float]] = {}
    rankers = {"sharpness rule": [r["sharpness rule"] for r in rules]}
    rankers.update({row: head_scores_[row][seeds[0]] for row in HEADS})
    for label, scores in rankers.items():
        total: dict[str, list[int]] = {}
        for fold, s in zip(folds, scores, strict=True):
            for kind, (w, n) in keeper_beats(fold.table, fold.rows("test"), s).items():
                t = total.setdefault(kind, [0, 0])
                t[0], t[1] = t[0] + w, t[1] + n
        beats[label] = {k: round(w / n, 3) for k, (w, n) in sorted(total.items())}
    mlp, tr = rows[MAIN], rows["transformer, embedding+quality"]
    bar = {
        "mlp_minus_sharpness_pts": round(100 * (mlp["top1"] - rows["sharpness rule"]["top1"]), 1),
        "mlp_minus_random_pts": round(100 * (mlp["top1"] - rows["random (expected)"]["top1"]), 1),
        "transformer_minus_mlp_pts": round(100 * (tr["top1"] - mlp["top1"]), 1),
    }
    bar["holds"] = (
        bar["mlp_minus_sharpness_pts"] >= 25
        and bar["mlp_minus_random_pts"] >= 35
        and bar["transformer_minus_mlp_pts"] >= 0
    )
    return {
        "rows": rows,
        "bar": bar,
        "folds": fold_info,
        "keeper_beats_shots_with": beats,
        "single_feature_rules_top1": feature_rules(folds),
    }


# --------------------------------------------------------------------------------------------
# The Ray Train job, and main


def ray_job(emb: str, manifest: str, cache: Path, hp: dict[str, Any]) -> dict[str, Any]:
    """One real Ray Train + MLflow run of the chosen MLP on the series split, seed 0."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    cfg = TrainHeadConfig.model_validate(
        {
            **split_fields(emb, manifest)["series"][0],
            "head": "mlp",
            "features": "embedding+quality",
            **COMMON,
            **hp,
            "num_workers": 1,
            "baselines": True,
            "storage": str(cache / "ray-checkpoints"),
            "tracking_uri": f"sqlite:///{cache / 'mlflow.db'}",
            "data_dir": str(cache / "keeper-data"),
            "experiment": f"quality-bar-{stamp}",
        }
    )
    import ray

    if not ray.is_initialized():  # a Ray of our own, not one another process started here
        ray.init(address="local")
    t0 = time.perf_counter()
    summary = train_head.run(cfg)
    return {
        "config": {k: v for k, v in cfg.model_dump().items() if k in (*HP_KEYS, *COMMON)},
        "num_workers": cfg.num_workers,
        "seconds": round(time.perf_counter() - t0, 1),
        "fit_seconds": summary["fit_seconds"],
        "run_id": summary["run_id"],
        "tracking_uri": summary["tracking_uri"],
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "test": {
            name: {
                **{k: round(float(m[k]), 4) for k in ("top1", "top2", "top3", "mrr")},
                "n_series": int(m["n_series"]),
            }
            for name, m in summary["test"].items()
        },
        "table": summary["table"],
    }


def fmt_row(name: str, r: dict[str, Any]) -> str:
    seeds = len(r.get("per_seed_top1", [])) > 1  # a trained head: mean +- std over seeds

    def pm(k: str, scale: float, digits: int) -> str:
        v, sd = scale * r[k], scale * r[f"{k}_std"]
        return f"{v:.{digits}f}" + (f" +- {sd:.{digits}f}" if seeds else "")

    cells = [pm("top1", 100, 1), pm("top2", 100, 1), pm("top3", 100, 1), pm("mrr", 1, 3)]
    return f"{name:31s} {r['n_series']:6d}  " + "  ".join(f"{c:>14s}" for c in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=660)
    parser.add_argument("--corpus-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma separated")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/keeper-bench/qb"))
    parser.add_argument("--tune", action="store_true", help="grid-search on val first")
    parser.add_argument("--ray-job", action="store_true", help="also run one Ray Train job")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_bar.json"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    # Tiny heads: more threads only add overhead, and one thread makes every run repeatable.
    torch.set_num_threads(1)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]

    emb, manifest = make_data(args.cache, args.series, args.corpus_seed)
    splits = {name: [Fold(f) for f in fs] for name, fs in split_fields(emb, manifest).items()}
    tuning: list[dict[str, Any]] = []
    chosen = {"series": [CHOSEN], "photo": CHOSEN_PHOTO}
    tuning_source = "benchmarks/results/quality_bar_tuning.json"
    if args.tune:
        chosen, tuning = tune(splits, tuning_folds(emb, manifest, splits))
        tuning_source = str(args.out)
    results: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "corpus": {
            "series": args.series,
            "seed": args.corpus_seed,
            "size": f"{SIZE[0]}x{SIZE[1]}",
            "photos": list(PHOTOS),
            "model": MODEL,
        },
        "training_seeds": seeds,
        "common": COMMON,
        "grid": GRID,
        "selection": SELECTION,
        "hyperparameters": chosen,
        "defaults": {k: TrainHeadConfig.model_fields[k].default for k in HP_KEYS},
        "tuning_source": tuning_source,
        "tuning": tuning,
        "machine": machine_info(),
        "loadavg_start": round(load_start, 2),
        "splits": {},
    }
    header = f"{'method':31s} {'series':>6s}  " + "  ".join(
        f"{c:>14s}" for c in ("top1 %", "top2 %", "top3 %", "MRR")
    )
    lines = []
    for name, folds in splits.items():
        res = evaluate_split(name, folds, chosen[name], seeds)
        results["splits"][name] = res
        b = res["bar"]
        lines += [f"\nsplit: {name}", header, "-" * len(header)]
        lines += [fmt_row(row, r) for row, r in res["rows"].items()]
        lines.append(
            f"bar: MLP - sharpness {b['mlp_minus_sharpness_pts']:+.1f} pts (>= 25), "
            f"MLP - random {b['mlp_minus_random_pts']:+.1f} (>= 35), "
            f"transformer - MLP {b['transformer_minus_mlp_pts']:+.1f} (>= 0): "
            + ("holds" if b["holds"] else "MISSED")
        )
    if args.ray_job:
        results["ray_job"] = ray_job(emb, manifest, args.cache, chosen["series"][0][MAIN])
        lines += ["\nRay Train job (1 worker), series split, seed 0:", results["ray_job"]["table"]]
    results["loadavg_end"] = round(os.getloadavg()[0], 2)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["table"] = "\n".join(lines)
    print(results["table"])
    write_record(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
