"""What the Ray Train jobs (train_head, finetune) share: data ingest, storage, polling, drills.

Imported by a job's driver and by its ``train_loop_per_worker`` on the workers; Ray is imported
only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator

from keeper_core import storage
from keeper_core.errors import KeeperError, remote_cause
from keeper_train.cluster import custom_resources

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextlib.contextmanager
def controller_poll(seconds: float) -> Iterator[None]:
    """Ray Train's controller poll interval for the fits started inside the block.

    The controller takes one worker report per poll (a queue of one), so with Ray's default of
    2 s no epoch of a small model is shorter than 2 s (benchmarks/train_head.py: 230 series/s at
    2 s, 2,256 at 0.2 s). Ray copies the variable from the driver's environment to the controller
    at ``fit()``; a value the user exported wins; the environment is restored afterwards.
    """
    before = os.environ.get(HEALTH_CHECK_ENV)
    os.environ[HEALTH_CHECK_ENV] = before or f"{seconds:g}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(HEALTH_CHECK_ENV, None)
        else:
            os.environ[HEALTH_CHECK_ENV] = before


def data_config() -> Any:
    """Split train equally (Ray's streaming_split(equal=True)), in order, deterministically.

    preserve_order makes the split ignore locality, so each rank gets the same series on every
    run and after every restart; equal=True gives each ``len / world`` rows, which
    ``keeper_core.training.shard_order``'s padding makes exact (no row is truncated).
    """
    from ray.train import DataConfig

    with warnings.catch_warnings():
        # Ray's own helper passes its deprecated exclude_resources on (ray 2.60): a warning on
        # every run that the user can do nothing about. The value still carries over.
        warnings.filterwarnings("ignore", message="`ExecutionOptions.exclude_resources` is dep")
        options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options={"train": options})


def storage_for_ray(uri: str) -> tuple[str, Any]:
    """Ray Train's storage_path (+ filesystem): absolute local paths, or S3 via pyarrow."""
    if not storage.is_s3(uri):
        return str(Path(uri).expanduser().resolve()), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return uri, None
    scheme, _, host = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme)
    return uri.removeprefix("s3://"), fs


def mean_over_workers(value: float, world: int, device: torch.device) -> float:
    """The mean of ``value`` over the workers (equal shards: the epoch's loss per series)."""
    if world == 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL takes CUDA tensors
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def load_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` (no pickle: ``weights_only``), every tensor on the CPU.

    A GPU worker saves CUDA tensors (model, optimizer state); without ``map_location`` the
    driver, often on a node without a GPU, could not read the checkpoint it trained. A worker
    that resumes puts them back on its device (``load_state_dict`` copies into the parameters,
    an optimizer moves its state to its parameters' device).
    """
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def maybe_fail(config: dict[str, Any], epoch: int, rank: int) -> None:
    """Fault drill: rank 0 fails once at ``fail_at_epoch`` (a marker makes it one-shot)."""
    if config.get("fail_at_epoch") != epoch or rank != 0:
        return
    marker = storage.join(config["storage"], config["run_name"], "_injected_failure")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"failed once\n")
    raise RuntimeError(f"injected failure at epoch {epoch} (fail_at_epoch)")


class WorkerPlacement(BaseModel):
    """Where a Ray Train job's workers go (fields of the train_head and finetune configs)."""

    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray's placement of the workers: PACK fills a node first, SPREAD spreads "
        "them, STRICT_SPREAD puts each on its own node (fails to start with fewer nodes)",
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker needs beside its CPU (and GPU), e.g. "
        "{keeper_gpu_node: 1}: the workers go only to nodes that offer them",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "num_workers and use_gpu")

    def scaling_config(self, num_workers: int, use_gpu: bool) -> Any:
        """Ray Train's ScalingConfig: one CPU (and one GPU) a worker, plus the custom resources."""
        import ray.train

        per_worker = None
        if self.resources_per_worker:
            per_worker = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
            per_worker.update(self.resources_per_worker)
        return ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            placement_strategy=self.placement_strategy,
            resources_per_worker=per_worker,
        )


def worker_nodes(world: int) -> list[str]:
    """The Ray node id of every worker, by rank (a collective: every worker calls it)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not torch.distributed.is_initialized():
        return [node]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, node)
    return [str(n) for n in out]


def worker_error(e: BaseException) -> KeeperError | None:
    """The KeeperError a Ray Train worker raised, out of what ``trainer.fit()`` raised; None if
    there is none (a crash, a bug: Ray's own error says more).

    Ray Train v2 raises ``WorkerGroupError``, whose ``worker_failures`` maps each failed rank to
    its exception (sent back whole: KeeperErrors pickle); a ``ControllerError`` keeps its own in
    ``controller_failure``, a ``RayTaskError`` in ``cause`` (``remote_cause``). Searched breadth
    first, rank 0 first, through ``__cause__`` and ``__context__`` too.
    """
    seen: set[int] = set()
    todo: deque[object] = deque([e])
    while todo:
        x = todo.popleft()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        # A RayTaskError(ModelLoadError) is a KeeperError too, whose str() is a remote traceback.
        x = remote_cause(x)
        if isinstance(x, KeeperError):
            return x
        for name in ("worker_failures", "controller_failure"):
            try:
                inner = getattr(x, name, None)
            except Exception:  # a wrapper's __getattr__ may itself fail
                continue
            if isinstance(inner, dict):  # worker_failures: rank -> exception
                todo.extend(inner[rank] for rank in sorted(inner))
            else:
                todo.append(inner)
        todo.extend((x.__cause__, x.__context__))
    return None


def fit(trainer: Any, poll_s: float) -> Any:
    """``trainer.fit()`` under :func:`controller_poll`; a KeeperError a worker raised (a base
    that cannot load, unequal shards) is raised as itself (:func:`worker_error`), so the CLI
    prints its one line and exits 2, not Ray's traceback of every worker."""
    try:
        with controller_poll(poll_s):
            return trainer.fit()
    except Exception as e:  # Ray Train's TrainingFailedError, once max_failures are spent
        cause = worker_error(e)
        if cause is None:
            raise
        raise cause from e
