"""Fine-tuned rankers against frozen heads, on series split by base photo (the issue's quality bar).

    .venv/bin/python benchmarks/finetune_quality.py --folds 0,1,2,3 --out benchmarks/results/finetune_quality.json
    .venv/bin/python benchmarks/finetune_quality.py --folds 0,1 --threads 1 --out PART_A  # one process
    .venv/bin/python benchmarks/finetune_quality.py --folds 2,3 --threads 1 --out PART_B  # per core,
    .venv/bin/python benchmarks/finetune_quality.py --merge PART_A PART_B      # then merge the parts

Data: 3,000 burst-like series (``--series``; the first 660 are the 660-series corpus, as a series
does not depend on the count) from all 17 scikit-image photos (``keeper_core.synthetic``), made at
86x64: the size keeper-tiny's tower sees. At the default 320x240 the 64-px input is a 3.75x
downscale that erases most of the blur and noise the keeper differs by, and no fine-tune can learn
what its pixels no longer hold (docs/finetuning.md). Every image is prepared once with
``keeper_core.preparation.ImagePreparation`` (as ``keeper finetune``'s decode tasks do): uint8
pixels and the quality features.

Split: by base photo, the folds of benchmarks/quality_bar.py (17 photos dealt into 4 groups; fold k
tests group k and stops early on 3 photos of group k+1); pooled over folds, every series is tested
once.

Every row trains with the job's recipe in one process (``keeper_train.jobs.finetune``'s
``param_groups``, ``warmup_cosine``, ``unpack`` with series-wide flip and shift, series-softmax
loss, early stopping on val top-1: the best val epoch's test figures), keeper-tiny:random, seed 0:

- frozen (MLP) and frozen-transformer (the series transformer head): the tower frozen, a head on
  its embedding (what ``keeper train-head`` over an embedding table of the same pixels does), with
  and without the quality features;
- lora, last-blocks, last-blocks+lora: ``keeper_core.tower`` methods, with and without the
  quality features;
- the sharpness rule and random, on the same test series.

The settings (LoRA r=8 at lr 3e-3, unfrozen blocks at 1e-3, head at 1e-3, batch 16 series) were
chosen by looking at fold 0 (val and test) of the 660-series corpus with a handful of runs; the
10-epoch budget from one fold-0 run of the frozen MLP and last-blocks+lora on 3,000 series, whose
val top-1 peaked by epoch 4 of 20. Nothing was tuned per fold. ``--seed`` draws every row
again (docs/finetuning.md section 8 has two seeds); ``--aux-quality W`` adds an experiment's
auxiliary loss to the fine-tuned rows (``QualityProbe``); ``--patch-shuffle`` trains every row on
images whose patch grid is permuted (``shuffle_patches``, docs/finetuning.md section 8);
``--conv-adapter WIDTH`` gives the fine-tuned rows' patch embedding a CNN branch (``ConvAdapter``).

Bar: fine-tuned with embedding only >= 15 points top-1 above the frozen embedding-only MLP;
fine-tuned with embedding+quality not below the frozen embedding+quality MLP.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from embed import machine_info

from keeper_core.finetune import TunedRanker, TunedRankerModel
from keeper_core.heads import HeadConfig, series_softmax_loss
from keeper_core.metrics import SeriesMetrics, format_table, series_metrics
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import QUALITY_INPUTS, RankerConfig, fit_standardizer
from keeper_core.synthetic import PHOTOS, generate_corpus
from keeper_core.tower import TowerConfig
from keeper_train.jobs.finetune import param_groups, unpack, warmup_cosine

MODEL = "keeper-tiny:random"
N_FOLDS, N_VAL_PHOTOS = 4, 3
QI = [FEATURE_NAMES.index(n) for n in QUALITY_INPUTS]
ROWS = [
    ("frozen", "embedding"),
    ("frozen-transformer", "embedding"),
    ("lora", "embedding"),
    ("last-blocks", "embedding"),
    ("last-blocks+lora", "embedding"),
    ("frozen", "embedding+quality"),
    ("frozen-transformer", "embedding+quality"),
    ("lora", "embedding+quality"),
    ("last-blocks", "embedding+quality"),
    ("last-blocks+lora", "embedding+quality"),
]
SETTINGS = {
    "epochs": 10,
    "batch_size": 16,
    "lr_lora": 3e-3,
    "lr_backbone": 1e-3,
    "lr_head": 1e-3,
    "weight_decay": 1e-4,
    "warmup_epochs": 1.0,
    "rank": 8,
    "alpha": 16,
    "unfreeze_blocks": 1,
    "hidden": 128,
    "max_shift": 0.0625,
    "flip": True,
    "readout": "tok",
    "aux_quality": 0.0,
    "patch_shuffle": False,
    "conv_adapter": 0,
}


class ConvAdapter(torch.nn.Module):
    """An experiment (--conv-adapter WIDTH): the patch embedding ``conv1`` plus a small CNN branch
    on the same pixels (3x3 convolutions, two 2x poolings, then an average over each patch's
    cells), added to its output through a zero-initialised 1x1 convolution, so the tower starts
    as the base model. It gives the fine-tuned tower the local-texture bias of
    benchmarks/finetune_probe.py's CNN (the same four convolutions)."""

    def __init__(self, conv1: torch.nn.Conv2d, width: int) -> None:
        super().__init__()
        nn, c = torch.nn, width
        self.conv1 = conv1
        self.branch = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(),
        )  # fmt: skip
        self.out = nn.Conv2d(2 * c, conv1.out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.conv1(x)
        cells = torch.nn.functional.adaptive_avg_pool2d(self.branch(x), base.shape[-2:])
        return base + self.out(cells)


def shuffle_patches(
    pixels: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator, patch: int
) -> torch.Tensor:
    """An experiment (--patch-shuffle): one random permutation of the patch grid per series, the
    same for all its shots: (N, 3, S, S) -> the same tokens in other places."""
    out, start = [], 0
    s = pixels.shape[-1]
    g = s // patch
    for n in mask.sum(1).tolist():
        px = pixels[start : start + n]
        start += n
        perm = torch.from_numpy(rng.permutation(g * g))
        blocks = px.reshape(n, 3, g, patch, g, patch).permute(0, 1, 2, 4, 3, 5)
        blocks = blocks.reshape(n, 3, g * g, patch, patch)[:, :, perm]
        out.append(
            blocks.reshape(n, 3, g, g, patch, patch).permute(0, 1, 2, 4, 3, 5).reshape(px.shape)
        )
    return torch.cat(out)


def prepare_corpus(cache: Path, n_series: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The corpus at 86x64 and every image prepared once (cached as .npz)."""
    from multiprocessing import Pool

    cache = cache / f"series-{n_series}"
    manifest = cache / "corpus" / "manifest.csv"
    if not manifest.is_file():
        generate_corpus(
            cache / "corpus", n_series=n_series, seed=0, image_size=(86, 64), photos=PHOTOS
        )
    df = pd.read_csv(manifest)
    npz = cache / "pixels.npz"
    if not npz.is_file():
        uris = df["image_uri"].tolist()
        chunks = [uris[i : i + 200] for i in range(0, len(uris), 200)]
        with Pool(2) as pool:
            parts = pool.map(_prepare, chunks)
        np.savez(
            npz, px=np.concatenate([p for p, _ in parts]), q=np.concatenate([q for _, q in parts])
        )
    z = np.load(npz)
    return df, z["px"], z["q"].astype(np.float32)


def _prepare(uris: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from keeper_core.preparation import ImagePreparation

    prep = ImagePreparation(MODEL)
    done = [prepare_image(prep, Path(u).read_bytes(), u) for u in uris]
    return np.stack([p for p, _ in done]), np.stack([q for _, q in done])


def prepare_image(prep: Any, data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """One encoded image as a series row holds it: flat uint8 pixels and the ranker's quality
    inputs (``prep``: an ``ImagePreparation`` for ``MODEL``)."""
    d = prep.decode(data, source=source)
    return prep.resize(d).reshape(-1), prep.quality([d])[0, QI]


def fold_split(df: pd.DataFrame, k: int) -> np.ndarray:
    """ "train", "val" or "test" per manifest row for fold ``k`` (by base photo)."""
    val_photos, test_photos = folds()[k]
    return np.where(
        df["base_photo"].isin(test_photos),
        "test",
        np.where(df["base_photo"].isin(val_photos), "val", "train"),
    )


def folds() -> list[tuple[list[str], list[str]]]:
    """(val photos, test photos) per fold: benchmarks/quality_bar.py's photo folds."""
    order = [PHOTOS[i] for i in np.random.default_rng(0).permutation(len(PHOTOS))]
    g = [order[k::N_FOLDS] for k in range(N_FOLDS)]
    return [(g[(k + 1) % N_FOLDS][:N_VAL_PHOTOS], g[k]) for k in range(N_FOLDS)]


def series_rows(
    df: pd.DataFrame, px: np.ndarray, q: np.ndarray, mask: np.ndarray
) -> list[dict[str, Any]]:
    """The job's series rows (``unpack``'s input) for the manifest rows under ``mask``."""
    part = df[mask]
    out = []
    for _, idx in part.groupby("series_id", sort=True).indices.items():
        rows = part.index.to_numpy()[idx]
        out.append(
            {
                "pixels": px[rows].reshape(-1),
                "quality": q[rows].reshape(-1),
                "length": len(rows),
                "best": int(np.argmax(df["is_best"].to_numpy()[rows])),
            }
        )
    return out


def as_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {k: np.empty(len(rows), dtype=object) for k in ("pixels", "quality")}
    for i, r in enumerate(rows):
        batch["pixels"][i], batch["quality"][i] = r["pixels"], r["quality"]
    batch["length"] = np.array([r["length"] for r in rows], np.int32)
    batch["best"] = np.array([r["best"] for r in rows], np.int32)
    return batch


class QualityProbe(torch.nn.Module):
    """--aux-quality (an experiment, docs/finetuning.md section 8): the ranker, and a linear probe
    that predicts the standardised quality features from the same tower embedding while training.
    The ranker still reads the embedding alone; the probe is thrown away.

    ``forward(pixels, mask, quality) -> (scores (B, L), the probe's mean squared error)``.
    """

    def __init__(self, model: TunedRankerModel, dim: int, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.probe = torch.nn.Linear(dim, len(mean))
        self.register_buffer("q_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("q_std", torch.tensor(std, dtype=torch.float32))

    def forward(
        self, pixels: torch.Tensor, mask: torch.Tensor, quality: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model.tower(pixels)
        target = (quality.float() - self.q_mean) / self.q_std
        loss = torch.nn.functional.mse_loss(self.probe(emb), target)
        return self.model.score_embeddings(emb, mask, quality), loss


def train_one(
    method: str,
    features: str,
    data: dict[str, list[dict[str, Any]]],
    train_q: np.ndarray,
    seed: int,
) -> tuple[SeriesMetrics, SeriesMetrics, int, float, list[dict[str, float]]]:
    """(best val metrics, test metrics at the best val epoch, trainable params, seconds, and per
    epoch val top-1, val loss and test top-1: what other selection rules would have given)."""
    s = SETTINGS
    uses_q = features == "embedding+quality"
    frozen = method.startswith("frozen")
    kind = "transformer" if method == "frozen-transformer" else "mlp"
    mean, std = fit_standardizer(train_q)
    tower = TowerConfig(
        base_spec=MODEL,
        method="lora" if frozen else method,  # type: ignore[arg-type]
        rank=s["rank"],
        alpha=s["alpha"],
        unfreeze_blocks=s["unfreeze_blocks"],
    )
    rc = RankerConfig(
        head=HeadConfig(
            kind=kind, in_dim=64 + (8 if uses_q else 0), hidden=s["hidden"], layers=2, heads=4
        ),
        features=features,  # type: ignore[arg-type]
        embedding_spec=MODEL,
        embed_dim=64,
        quality_names=list(QUALITY_INPUTS) if uses_q else [],
        quality_mean=mean if uses_q else [],
        quality_std=std if uses_q else [],
        tower=tower,
    )
    ranker = TunedRanker.build(rc, device="cpu", seed=seed)
    # open_clip's pooling of the last block's tokens: "tok" (the class token, the model's own
    # embedding) or "avg" (the mean of the patch tokens; an experiment, see --readout)
    ranker.model.tower.visual.pool_type = s["readout"]
    if frozen:  # a head over the frozen tower's embedding
        for p in ranker.parts.lora.values():
            p.requires_grad_(False)
        ranker.parts.lora = {}
    cfg = {k: s[k] for k in ("lr_backbone", "lr_lora", "lr_head", "weight_decay")}
    groups = param_groups(ranker, cfg)
    # --aux-quality: a frozen tower's embedding cannot change, so its rows train without it
    aux = 0.0 if frozen else s["aux_quality"]
    # made for every row, used or not: its init draws from torch's generator, and the committed
    # results (benchmarks/results/finetune_quality_seeds/) were drawn with it in the sequence
    probe = QualityProbe(ranker.model, rc.embed_dim, mean, std)
    if aux:
        groups.append(
            {
                "params": list(probe.probe.parameters()),
                "lr": s["lr_head"],
                "weight_decay": s["weight_decay"],
            }
        )
    if s["conv_adapter"] and not frozen:
        visual = ranker.model.tower.visual
        visual.conv1 = ConvAdapter(visual.conv1, s["conv_adapter"])
        groups.append(
            {
                "params": list(visual.conv1.branch.parameters())
                + list(visual.conv1.out.parameters()),
                "lr": s["lr_lora"],
                "weight_decay": s["weight_decay"],
            }
        )
    opt = torch.optim.AdamW(groups)
    train = data["train"]
    steps = math.ceil(len(train) / s["batch_size"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(int(s["warmup_epochs"] * steps), steps * s["epochs"])
    )
    size = ranker.image_size
    shift = round(s["max_shift"] * size)
    model = ranker.model
    patch = model.tower.visual.patch_size[0]

    def evaluate(rows: list[dict[str, Any]]) -> tuple[SeriesMetrics, float]:
        """The metrics and the mean series-softmax loss (NLL of the true keeper)."""
        model.eval()
        scores, best = [], []
        with torch.no_grad():
            for i in range(0, len(rows), 64):
                pixels, mask, b, quality = unpack(as_batch(rows[i : i + 64]), size)
                out = model(pixels, mask, quality)
                scores += [out[j, : int(mask[j].sum())].numpy() for j in range(len(b))]
                best += b.tolist()
        nll = [float(np.logaddexp.reduce(sc) - sc[b]) for sc, b in zip(scores, best, strict=True)]
        return series_metrics(scores, best), float(np.mean(nll))

    t0 = time.perf_counter()
    best_val: SeriesMetrics | None = None
    test_at_best: SeriesMetrics | None = None
    history: list[dict[str, float]] = []
    for epoch in range(s["epochs"]):
        model.train()
        rng = np.random.default_rng([seed, epoch, 0])
        order = rng.permutation(len(train))
        for i in range(0, len(order), s["batch_size"]):
            chunk = [train[j] for j in order[i : i + s["batch_size"]]]
            pixels, mask, b, quality = unpack(
                as_batch(chunk), size, rng=rng, max_shift=shift, flip=s["flip"]
            )
            if s["patch_shuffle"]:
                pixels = shuffle_patches(pixels, mask, rng, patch)
            if aux:
                scores, aux_loss = probe(pixels, mask, quality)
                loss = series_softmax_loss(scores, mask, b) + aux * aux_loss
            else:
                loss = series_softmax_loss(model(pixels, mask, quality), mask, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val, val_nll = evaluate(data["val"])
        test, _ = evaluate(data["test"])  # every epoch: what other selection rules would give
        history.append(
            {"epoch": epoch, "val_top1": val.top1, "val_nll": val_nll, "test_top1": test.top1}
        )
        if best_val is None or val.top1 > best_val.top1:
            best_val, test_at_best = val, test
    assert best_val is not None
    assert test_at_best is not None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return best_val, test_at_best, trainable, time.perf_counter() - t0, history


def pooled(parts: list[SeriesMetrics]) -> SeriesMetrics:
    """Metrics over the union of the folds' test series (weighted by series)."""
    n = sum(p.n_series for p in parts)
    fields = {
        f: sum(getattr(p, f) * p.n_series for p in parts) / n
        for f in parts[0].as_dict()
        if f != "n_series"
    }
    return type(parts[0])(n_series=n, **fields)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", default="0,1,2,3")
    parser.add_argument("--series", type=int, default=3000)
    parser.add_argument("--cache", default="/tmp/keeper-finetune-quality")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seed", type=int, default=0, help="every row's seed (model init, order, augmentation)"
    )
    parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"], help="the epoch budget")
    parser.add_argument(
        "--features", choices=["embedding", "embedding+quality"], help="only the rows of these"
    )
    parser.add_argument(
        "--readout",
        choices=["tok", "avg"],
        default="tok",
        help="the tower's pooling for every row: tok = the class token (the model's embedding); "
        "avg = the mean of the patch tokens (docs/finetuning.md section 8)",
    )
    parser.add_argument(
        "--aux-quality",
        type=float,
        default=SETTINGS["aux_quality"],
        help="an experiment: weight of an auxiliary loss for the fine-tuned rows, a linear probe on "
        "the embedding predicting the quality features (QualityProbe; 0: none)",
    )
    parser.add_argument(
        "--patch-shuffle",
        action="store_true",
        help="an experiment: train on images whose patch grid is permuted, one permutation per "
        "series (shuffle_patches)",
    )
    parser.add_argument(
        "--conv-adapter",
        type=int,
        default=0,
        metavar="WIDTH",
        help="an experiment: the fine-tuned rows' patch embedding gets a CNN branch of this width "
        "(ConvAdapter; 0: none)",
    )
    parser.add_argument(
        "--methods", help="only these methods (comma-separated, e.g. frozen,last-blocks+lora)"
    )
    parser.add_argument("--out", default="benchmarks/results/finetune_quality.json")
    parser.add_argument("--merge", nargs="*", help="merge these per-fold JSON parts into --out")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    SETTINGS["epochs"] = args.epochs
    SETTINGS["readout"] = args.readout
    SETTINGS["aux_quality"] = args.aux_quality
    SETTINGS["patch_shuffle"] = args.patch_shuffle
    SETTINGS["conv_adapter"] = args.conv_adapter
    methods = args.methods.split(",") if args.methods else None
    t0 = time.perf_counter()
    df, px, q = prepare_corpus(Path(args.cache), args.series)
    results: dict[str, Any] = {"folds": {}}
    for k in [int(f) for f in args.folds.split(",")]:
        val_photos, test_photos = folds()[k]
        split = fold_split(df, k)
        data = {name: series_rows(df, px, q, split == name) for name in ("train", "val", "test")}
        train_q = q[split == "train"]
        fold: dict[str, Any] = {"val_photos": val_photos, "test_photos": test_photos, "rows": {}}
        test = data["test"]
        best = [r["best"] for r in test]
        j = QUALITY_INPUTS.index("sharpness")
        sharp = [r["quality"].reshape(r["length"], -1)[:, j] for r in test]
        fold["rows"]["sharpness rule"] = {"test": series_metrics(sharp, best).as_dict()}
        for method, features in ROWS:
            if args.features and features != args.features:
                continue
            if methods and method not in methods:
                continue
            val, tst, trainable, secs, history = train_one(
                method, features, data, train_q, seed=args.seed
            )
            name = f"{method}, {features}"
            fold["rows"][name] = {
                "val": val.as_dict(),
                "test": tst.as_dict(),
                "trainable_params": trainable,
                "seconds": round(secs, 1),
                "epochs": history,
            }
            print(
                f"fold {k} {name:32s} val {val.top1:.3f} test {tst.top1:.3f} ({secs:.0f}s)",
                flush=True,
            )
        results["folds"][str(k)] = fold
    results.update(
        command=" ".join(sys.argv),
        settings=SETTINGS,
        seed=args.seed,
        corpus={"series": args.series, "size": "86x64", "photos": "all 17"},
        machine=machine_info(),
        seconds=round(time.perf_counter() - t0, 1),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if len(results["folds"]) == N_FOLDS:
        return merge([args.out], args.out)
    return 0


def merge(parts: list[str], out: str) -> int:
    """Pool the folds of one or more part files: the table and the bar."""
    folds_: dict[str, Any] = {}
    first: dict[str, Any] = {}
    for p in parts:
        d = json.loads(Path(p).read_text())
        first = first or d
        folds_.update(d["folds"])
    names = list(next(iter(folds_.values()))["rows"])
    table: dict[str, SeriesMetrics] = {}
    for name in names:
        table[name] = pooled([SeriesMetrics(**f["rows"][name]["test"]) for f in folds_.values()])
    text = format_table(table)
    bar: dict[str, Any] = {}
    for features, key, need in (
        ("embedding", "embedding", 15),
        ("embedding+quality", "quality", 0),
    ):
        if f"frozen, {features}" not in table:
            continue
        frozen = table[f"frozen, {features}"].top1
        gain = {
            m: round(100 * (table[f"{m}, {features}"].top1 - frozen), 1)
            for m in ("lora", "last-blocks", "last-blocks+lora")
            if f"{m}, {features}" in table  # a part file may hold some methods only
        }
        bar[f"{key}_gain_pts"] = gain
        bar[f"{key}_holds"] = {m: g >= need for m, g in gain.items()}
    selection = selection_rules(folds_, names)
    result = {
        **first,
        "folds": folds_,
        "pooled": {k: v.as_dict() for k, v in table.items()},
        "bar": bar,
        "selection": selection,
        "table": text,
    }
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"split by base photo, folds {sorted(folds_)} pooled:")
    print(text)
    print(json.dumps(bar, indent=2))
    if selection:
        print("pooled test top-1 by the epoch each rule keeps:")
        print(json.dumps(selection, indent=2))
    return 0


def selection_rules(folds_: dict[str, Any], names: list[str]) -> dict[str, dict[str, float]]:
    """Pooled test top-1 (%) of each row under three ways of choosing its epoch: the best val
    top-1 (the job's early stopping; the first such epoch), the lowest val loss, the last epoch.
    Rows whose part files have no per-epoch history are left out."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        rows = [f["rows"][name] for f in folds_.values()]
        if not all(r.get("epochs") for r in rows):
            continue
        picks: dict[str, list[tuple[float, int]]] = {"val_top1": [], "val_loss": [], "last": []}
        for r in rows:
            h, n = r["epochs"], r["test"]["n_series"]
            top = max(range(len(h)), key=lambda i: (h[i]["val_top1"], -i))
            low = min(range(len(h)), key=lambda i: h[i]["val_nll"])
            picks["val_top1"].append((h[top]["test_top1"], n))
            picks["val_loss"].append((h[low]["test_top1"], n))
            picks["last"].append((h[-1]["test_top1"], n))
        out[name] = {
            rule: round(100 * sum(t * n for t, n in v) / sum(n for _, n in v), 1)
            for rule, v in picks.items()
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
