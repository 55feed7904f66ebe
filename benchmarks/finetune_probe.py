"""Does the 64-px pixel input carry issue 12's label? A probe beside the keeper-tiny fine-tunes.

    .venv/bin/python benchmarks/finetune_probe.py --fold 0 --out benchmarks/results/finetune_probe.json

benchmarks/finetune_quality.py's corpus (3,000 series at 86x64) and fold split, two models trained
side by side on the same pixels with the same series-softmax loss, warm-up + cosine and early
stopping on val top-1 (the test figure is the one at the best val epoch):

- ``cnn``: a four-layer CNN (3x3 convolutions, global average pooling) from scratch: the inductive
  bias of a local-texture detector;
- ``vit-full``: keeper-tiny (the 2-block, 8-px-patch ViT) with **every** tower weight trainable
  from random init, plus lossless series-wide augmentation (the 8 rotations/transposes, a channel
  permutation, flip and shift), which change no pixel statistic the label rides on.

If the CNN reaches far above every keeper-tiny row, the label is in the pixels and the limit of the
fine-tunes is the tower's inductive bias on ~10 training scenes, not the recipe: see
docs/finetuning.md section 8.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import finetune_quality as fq
import numpy as np
import torch
from embed import machine_info
from torch import nn

from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig, series_softmax_loss
from keeper_core.metrics import SeriesMetrics, series_metrics
from keeper_core.ranker import RankerConfig
from keeper_core.tower import TowerConfig
from keeper_train.jobs.finetune import param_groups, unpack, warmup_cosine


class ProbeCNN(nn.Module):
    """A small from-scratch CNN scorer with the rankers' forward signature."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        c = width
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * c, 64), nn.GELU(), nn.Linear(64, 1),
        )  # fmt: skip

    def forward(
        self, pixels: torch.Tensor, mask: torch.Tensor, quality: Any = None
    ) -> torch.Tensor:
        s = self.net(pixels.float() / 255.0).squeeze(1)
        out = s.new_full(mask.shape, -1e9)
        out[mask] = s
        return out


def vit_full(lr: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    """keeper-tiny with every tower weight trainable, an MLP head on its embedding."""
    tower = TowerConfig(base_spec=fq.MODEL, method="last-blocks", unfreeze_blocks=2)
    rc = RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=64, hidden=128, layers=2, heads=4),
        features="embedding",
        embedding_spec=fq.MODEL,
        embed_dim=64,
        tower=tower,
    )
    ranker = TunedRanker.build(rc, device="cpu", seed=0)
    for name, p in ranker.model.tower.visual.named_parameters():
        if not p.requires_grad:  # conv1, embeddings, ln_pre: the rest trains already
            p.requires_grad_(True)
            ranker.parts.backbone[name] = p
    cfg = {"lr_backbone": lr, "lr_lora": lr, "lr_head": 1e-3, "weight_decay": 1e-4}
    return ranker.model, torch.optim.AdamW(param_groups(ranker, cfg))


def lossless(pixels: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One rotation/transpose and channel permutation per series (all its shots alike)."""
    lengths = [int(n) for n in mask.sum(1).tolist()]
    parts = []
    for part in torch.split(pixels, lengths):
        part = torch.rot90(part, int(rng.integers(4)), dims=(2, 3))
        if rng.random() < 0.5:
            part = part.transpose(2, 3)
        parts.append(part[:, rng.permutation(3)].contiguous())
    return torch.cat(parts)


def train(name: str, data: dict[str, list[dict[str, Any]]], epochs: int) -> dict[str, Any]:
    torch.manual_seed(0)
    if name == "cnn":
        model: nn.Module = ProbeCNN()
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=3e-3, weight_decay=1e-4
        )
    else:
        model, opt = vit_full(3e-4)
    size, bs, rows = 64, 16, data["train"]
    steps = math.ceil(len(rows) / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, steps * epochs))

    def evaluate(part: list[dict[str, Any]]) -> SeriesMetrics:
        model.eval()
        scores, best = [], []
        with torch.no_grad():
            for i in range(0, len(part), 64):
                px, mask, b, q = unpack(fq.as_batch(part[i : i + 64]), size)
                out = model(px, mask, q)
                scores += [out[j, : int(mask[j].sum())].numpy() for j in range(len(b))]
                best += b.tolist()
        return series_metrics(scores, best)

    t0, history = time.perf_counter(), []
    best_val: SeriesMetrics | None = None
    test_at_best: SeriesMetrics | None = None
    for epoch in range(epochs):
        model.train()
        rng = np.random.default_rng([0, epoch, 0])
        order = rng.permutation(len(rows))
        for i in range(0, len(order), bs):
            chunk = [rows[j] for j in order[i : i + bs]]
            px, mask, b, q = unpack(fq.as_batch(chunk), size, rng=rng, max_shift=4, flip=True)
            if name == "vit-full":
                px = lossless(px, mask, rng)
            loss = series_softmax_loss(model(px, mask, q), mask, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        val, test = evaluate(data["val"]), evaluate(data["test"])
        history.append({"epoch": epoch, "val_top1": val.top1, "test_top1": test.top1})
        print(f"{name} epoch {epoch} val {val.top1:.3f} test {test.top1:.3f}", flush=True)
        if best_val is None or val.top1 > best_val.top1:
            best_val, test_at_best = val, test
    assert best_val is not None
    assert test_at_best is not None
    return {
        "val": best_val.as_dict(),
        "test": test_at_best.as_dict(),
        "history": history,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--series", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--models", default="cnn,vit-full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="/tmp/keeper-finetune-quality")
    parser.add_argument("--out", default="benchmarks/results/finetune_probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    df, px, q = fq.prepare_corpus(Path(args.cache), args.series)
    val_photos, test_photos = fq.folds()[args.fold]
    split = np.where(
        df["base_photo"].isin(test_photos),
        "test",
        np.where(df["base_photo"].isin(val_photos), "val", "train"),
    )
    data = {n: fq.series_rows(df, px, q, split == n) for n in ("train", "val", "test")}
    rows = {m: train(m, data, args.epochs) for m in args.models.split(",")}
    for m, r in rows.items():
        print(f"{m:10s} best val {r['val']['top1']:.3f}  test at best val {r['test']['top1']:.3f}")
    out = {
        "command": " ".join(sys.argv),
        "fold": args.fold,
        "test_photos": test_photos,
        "series": args.series,
        "rows": rows,
        "machine": machine_info(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
