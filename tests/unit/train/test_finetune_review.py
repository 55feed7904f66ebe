"""keeper finetune: a bad base is refused before any image is decoded, a worker's KeeperError
reaches the CLI as one error line, the base is recorded by absolute path and version, and a run
resumed from a checkpoint trains as an uninterrupted one. No Ray is started here."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from keeper_core.errors import DataError, KeeperError, ModelLoadError
from keeper_core.heads import HeadConfig
from keeper_core.models import load_clip, save_checkpoint, weights_version
from keeper_core.ranker import RankerConfig
from keeper_core.tower import TowerConfig
from keeper_train import cluster, raytrain
from keeper_train.jobs import finetune


def _refuse(what: str) -> Any:
    def refused(*_: object, **__: object) -> None:
        raise AssertionError(f"the job reached {what} before refusing the base")

    return refused


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """30 series of 2 shots; the images are never read here."""
    path = tmp_path / "series.csv"
    pd.DataFrame(
        {
            "series_id": [f"s{i}" for i in range(30) for _ in range(2)],
            "image_uri": [f"img/{i}-{j}.jpg" for i in range(30) for j in range(2)],
            "is_best": [1, 0] * 30,
        }
    ).to_csv(path, index=False)
    return path


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the job gets as far as Ray or decoding."""
    monkeypatch.setattr(cluster, "init_ray", _refuse("Ray"))
    monkeypatch.setattr(finetune, "prepare", _refuse("decoding"))


# --------------------------------------------------------------------------------------------
# 1: a missing or bad base fails at plan time


def test_a_missing_base_file_is_refused_by_plan(manifest: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-base.safetensors"
    cfg = finetune.FinetuneConfig(series=str(manifest), model=f"keeper-tiny:{missing}")
    with pytest.raises(ModelLoadError, match=r"checkpoint file not found: .*no-such-base"):
        finetune.plan(cfg)


def test_a_base_file_of_another_shape_is_refused_by_plan(manifest: Path, tmp_path: Path) -> None:
    """It exists, but does not load as the workers load it (a truncated file, another model's)."""
    bad = tmp_path / "half.safetensors"
    good = tmp_path / "tiny.safetensors"
    save_checkpoint(load_clip("keeper-tiny:random", "cpu").model, good)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cfg = finetune.FinetuneConfig(series=str(manifest), model=f"keeper-tiny:{bad}")
    with pytest.raises(ModelLoadError, match=r"half\.safetensors"):
        finetune.plan(cfg)


def test_a_missing_base_object_on_s3_is_refused_by_plan(manifest: Path, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/bases/missing.safetensors"
    cfg = finetune.FinetuneConfig(series=str(manifest), model=f"keeper-tiny:{uri}")
    with pytest.raises(ModelLoadError, match=r"missing\.safetensors"):
        finetune.plan(cfg)


def test_the_cli_refuses_a_missing_base_before_ray_or_decoding(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_work: None
) -> None:
    code = finetune.main(
        [
            f"series={manifest}",
            f"model=keeper-tiny:{tmp_path / 'typo.safetensors'}",
            f"storage={tmp_path / 'ckpt'}",
            f"data_dir={tmp_path / 'kd'}",
            f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "keeper finetune: error: cannot load model" in err
    assert "typo.safetensors" in err
    assert "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run left behind


def test_plan_records_the_base_by_absolute_path_and_version(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative checkpoint path named a file relative to wherever evaluate or serve ran."""
    (tmp_path / "models").mkdir()
    save_checkpoint(load_clip("keeper-tiny:random", "cpu").model, tmp_path / "models/b.safetensors")
    monkeypatch.chdir(tmp_path)
    p = finetune.plan(
        finetune.FinetuneConfig(series=str(manifest), model="keeper-tiny:models/b.safetensors")
    )
    absolute = f"keeper-tiny:{tmp_path / 'models/b.safetensors'}"
    assert p.tower.base_spec == absolute
    assert p.tower.base_weights == weights_version(absolute)
    assert p.tower.base_weights is not None
    assert p.tower.base_weights.startswith("sha256:")

    random = finetune.plan(finetune.FinetuneConfig(series=str(manifest)))
    assert random.tower.base_spec == "keeper-tiny:random"
    assert random.tower.base_weights is None


# --------------------------------------------------------------------------------------------
# 1: a KeeperError raised in a worker is what the driver raises


def _worker_group_error(failures: dict[int, Exception]) -> Exception:
    from ray.train import WorkerGroupError

    # Through pickle, as the controller sends it to the driver.
    return pickle.loads(pickle.dumps(WorkerGroupError("rank 0 failed: <traceback>", failures)))


def test_worker_error_finds_the_workers_keeper_error() -> None:
    from ray.train import ControllerError

    err = ModelLoadError("keeper-tiny:/x.safetensors", "checkpoint file not found: /x.safetensors")
    found = raytrain.worker_error(_worker_group_error({1: RuntimeError("peer"), 0: err}))
    assert isinstance(found, ModelLoadError)
    assert str(found) == str(err)
    nested = ControllerError(RuntimeError("controller"))
    nested.__cause__ = _worker_group_error({0: DataError("bad shard")})
    assert isinstance(raytrain.worker_error(nested), DataError)
    # A RayTaskError(ModelLoadError) is a KeeperError too, but its str() is a remote traceback.
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    wrapped = RayTaskError("f", "Traceback (most recent call last): ...", err).as_instanceof_cause()
    assert type(raytrain.worker_error(WorkerGroupError("", {0: wrapped}))) is ModelLoadError
    # A crash or a bug has no KeeperError in it: Ray's own error stands.
    assert raytrain.worker_error(_worker_group_error({0: RuntimeError("boom")})) is None


def test_fit_raises_the_workers_keeper_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ray
    import ray.train.torch

    class FailingTrainer:
        def __init__(self, *_: object, **__: object) -> None:
            pass

        def fit(self) -> None:
            raise _worker_group_error(
                {0: ModelLoadError("keeper-tiny:/b.safetensors", "checkpoint file not found")}
            )

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FailingTrainer)
    cfg = finetune.FinetuneConfig(series="s.csv", storage=str(tmp_path / "ckpt"))
    p = finetune.Plan(
        rows=pd.DataFrame(),
        tower=cfg.tower_config(),
        image_size=64,
        manifest_sha256="0" * 64,
    )
    prepared = finetune.Prepared(
        datasets={"train": None, "val": None, "test": None},
        counts={"train": 2, "val": 1, "test": 1},
        dropped_series=0,
        images={"in": 8, "prepared": 8, "failed": 0},
        errors=pd.DataFrame(),
        quality_mean=[],
        quality_std=[],
        example=pd.DataFrame(),
        decode_seconds=0.0,
    )
    with pytest.raises(ModelLoadError, match="checkpoint file not found") as e:
        finetune.fit(
            cfg, p, prepared, _ranker_config(0.0, 0.0), run_id="r", tracking_uri="t",
            run_name="n",
        )  # fmt: skip
    assert isinstance(e.value, KeeperError)
    assert not ray.is_initialized()


# --------------------------------------------------------------------------------------------
# 3: a resumed run trains as an uninterrupted one


def _ranker_config(dropout: float, lora_dropout: float) -> RankerConfig:
    return RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=64, hidden=16, layers=1, dropout=dropout),
        features="embedding",
        embedding_spec="keeper-tiny:random",
        embed_dim=64,
        tower=TowerConfig(
            base_spec="keeper-tiny:random",
            method="last-blocks+lora",
            rank=4,
            dropout=lora_dropout,
        ),
    )


LOOP = {
    "lr_backbone": 1e-3, "lr_lora": 1e-2, "lr_head": 1e-2, "weight_decay": 1e-4, "seed": 3,
    "grad_accum": 1, "image_size": 64, "max_shift": 4, "flip": True,
}  # fmt: skip
SERIES, BATCH, EPOCHS = 6, 3, 3


def _batches() -> list[dict[str, np.ndarray]]:
    """The shard's series rows in Ray Data's numpy batch format (the same every epoch)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 4, SERIES)
    rows = [
        {
            "pixels": rng.integers(0, 256, n * 3 * 64 * 64, np.uint8),
            "quality": np.zeros(n * 8, np.float32),
            "length": int(n),
            "best": int(rng.integers(0, n)),
        }
        for n in lengths
    ]
    out = []
    for i in range(0, SERIES, BATCH):
        chunk = rows[i : i + BATCH]
        batch = {k: np.array([r[k] for r in chunk]) for k in ("length", "best")}
        for k in ("pixels", "quality"):
            batch[k] = np.empty(len(chunk), dtype=object)
            batch[k][:] = [r[k] for r in chunk]
        out.append(batch)
    return out


def _train(epochs: range, checkpoint: Path | None) -> dict[str, torch.Tensor]:
    """The worker's loop without Ray: build (seeded), resume from ``checkpoint`` as a restarted
    worker does, train ``epochs``, checkpoint as rank 0 does; the trained tensors."""
    from safetensors.torch import load_file, save_file

    from keeper_core.finetune import TunedRanker

    ranker = TunedRanker.build(_ranker_config(0.3, 0.3), device="cpu", seed=LOOP["seed"])
    opt = torch.optim.AdamW(finetune.param_groups(ranker, LOOP))
    steps = SERIES // BATCH
    sched = torch.optim.lr_scheduler.LambdaLR(opt, finetune.warmup_cosine(steps, steps * EPOCHS))
    if checkpoint is not None and (checkpoint / finetune.STATE).exists():
        trained = finetune._nested(load_file(str(checkpoint / finetune.TRAINED)))
        ranker.load_trained_state(trained, source=str(checkpoint))
        state = raytrain.load_state(checkpoint / finetune.STATE)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    for epoch in epochs:
        finetune.train_epoch(
            ranker.model, opt, sched, _batches(), seed=LOOP["seed"], epoch=epoch, rank=0,
            steps=steps, grad_accum=1, image_size=64, max_shift=4, flip=True,
            device=torch.device("cpu"), autocast=contextlib.nullcontext,
        )  # fmt: skip
    if checkpoint is not None:
        checkpoint.mkdir(exist_ok=True)
        save_file(finetune._flat(ranker.trained_state()), str(checkpoint / finetune.TRAINED))
        torch.save(
            {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
            checkpoint / finetune.STATE,
        )
    return finetune._flat(ranker.trained_state())


def test_a_resumed_run_trains_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """state.pt keeps no generator state and the restarted worker's build reseeds torch, so the
    resumed epochs replayed epoch 0's dropout masks (head dropout, lora_dropout)."""
    straight = _train(range(EPOCHS), None)
    _train(range(EPOCHS - 1), tmp_path / "ckpt")
    torch.manual_seed(12345)  # whatever the restarted process drew before
    resumed = _train(range(EPOCHS - 1, EPOCHS), tmp_path / "ckpt")
    assert straight.keys() == resumed.keys()
    moved = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not moved, f"{len(moved)} of {len(straight)} tensors differ, e.g. {moved[:3]}"


def test_an_epochs_randomness_depends_on_seed_epoch_and_rank_alone() -> None:
    torch.manual_seed(1)
    a = (finetune.epoch_rng(3, 2, 1).random(4), torch.rand(4))
    torch.manual_seed(2)
    b = (finetune.epoch_rng(3, 2, 1).random(4), torch.rand(4))
    np.testing.assert_array_equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    # the augmentation draws as before (numpy generator seeded by [seed, epoch, rank])
    np.testing.assert_array_equal(a[0], np.random.default_rng([3, 2, 1]).random(4))
    for other in ((4, 2, 1), (3, 3, 1), (3, 2, 0)):
        finetune.epoch_rng(*other)
        assert not torch.equal(torch.rand(4), a[1]), other


def test_unequal_shards_are_refused_by_the_epoch() -> None:
    from keeper_core.finetune import TunedRanker

    ranker = TunedRanker.build(_ranker_config(0.0, 0.0), device="cpu")
    opt = torch.optim.AdamW(finetune.param_groups(ranker, LOOP))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, finetune.warmup_cosine(1, 4))
    with pytest.raises(DataError, match="unequal shards"):
        finetune.train_epoch(
            ranker.model, opt, sched, _batches()[:1], seed=0, epoch=0, rank=0, steps=2,
            grad_accum=1, image_size=64, max_shift=0, flip=False,
            device=torch.device("cpu"), autocast=contextlib.nullcontext,
        )  # fmt: skip
