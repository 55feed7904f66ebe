"""The demo's fine-tune step: ``keeper finetune`` on the demo corpus, beside the champion head.

    python -m keeper_train.jobs.finetune_demo --out keeper-demo

Runs after ``keeper demo`` (which generated OUT/corpus, embedded it, trained, registered and
promoted a head). Fine-tunes keeper-tiny's vision tower (LoRA on every block) with a head on the
embedding and the quality features, on the same split by base photo the head was trained on; the
new version is registered as ``@challenger`` of the demo's ranker and not promoted, so the served
champion stays the head. Then one ``keeper evaluate`` table holds both on the held-out test series,
and ``keeper export --merge`` writes the tuned tower as one open_clip checkpoint (OUT/tuned-tower
.safetensors) whose ModelSpec ``keeper embed`` takes. Random base weights: the figures show the
machinery, not what a fine-tune of a real CLIP gives.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from keeper_core.errors import KeeperError
from keeper_train import tracking
from keeper_train.jobs import evaluate, export, finetune
from keeper_train.jobs.demo import DEMO_TEST_PHOTOS, DEMO_VAL_PHOTOS, _slug, quiet_libraries


def run(out: Path, *, model_name: str, epochs: int, ray_address: str | None) -> int:
    manifest = out / "corpus" / "manifest.csv"
    test_manifest = out / "test-manifest.csv"
    if not manifest.is_file() or not test_manifest.is_file():
        raise KeeperError(f"run the demo first: {manifest} or {test_manifest} is missing")
    uri = tracking.tracking_uri(None, out)
    t0 = time.perf_counter()
    print(f"fine-tuning keeper-tiny's tower (LoRA) on Ray Train (up to {epochs} epochs) ...")
    summary = finetune.run(
        finetune.FinetuneConfig(
            series=str(manifest),
            model="keeper-tiny:random",
            method="lora",
            features="embedding+quality",
            lr_lora=3e-3,
            lr_head=3e-3,
            epochs=epochs,
            patience=epochs,
            split_by="base_photo",
            val_groups=list(DEMO_VAL_PHOTOS),
            test_groups=list(DEMO_TEST_PHOTOS),
            storage=str(out / "checkpoints"),
            tracking_uri=uri,
            data_dir=str(out),
            register_model=model_name,
            ray_address=ray_address,
        )
    )
    print(finetune.format_summary(summary))
    assert summary.registered is not None
    tuned = f"models:/{model_name}/{summary.registered['version']}"
    registry = {"tracking_uri": uri, "data_dir": str(out)}
    embeddings = out / "embeddings" / _slug("keeper-tiny:random")
    evaluated = evaluate.run(
        evaluate.EvaluateConfig(
            model=[f"models:/{model_name}@{tracking.CHAMPION}", tuned],
            embeddings=str(embeddings),
            series=str(test_manifest),
            **registry,
        )
    )
    print()
    print("Held-out test series, the champion head and the fine-tuned challenger:")
    print(evaluate.format_summary(evaluated))
    exported = export.run(
        export.ExportConfig(
            model=tuned, output=str(out / "tuned-tower.safetensors"), merge=True, **registry
        )
    )
    print(export.format_result(exported))
    print(f"finetune demo: {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keeper_train.jobs.finetune_demo")
    parser.add_argument("--out", default="keeper-demo", help="the demo's folder")
    parser.add_argument("--model-name", default="keeper-demo-ranker", help="registered ranker")
    parser.add_argument("--epochs", type=int, default=8, help="fine-tune epochs")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: local)")
    args = parser.parse_args(argv)
    try:
        with quiet_libraries():
            return run(
                Path(args.out),
                model_name=args.model_name,
                epochs=args.epochs,
                ray_address=args.ray_address,
            )
    except KeeperError as e:
        print(f"finetune demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
