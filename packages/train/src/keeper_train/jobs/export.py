"""Export a registered ranker: a fine-tuned tower merged into one open_clip checkpoint, or the
ranker folder itself.

    keeper export models:/keeper-ranker@champion --merge --output /models/tuned.safetensors
    keeper export models:/keeper-ranker/4 --merge --output s3://models/tuned.safetensors
    keeper export models:/keeper-ranker@champion --output s3://models/ranker-v4/
    python -m keeper_train.jobs.export --config export.yaml [key=value ...]   # the same command

The version is resolved (an alias is printed as the version it named), its artifacts are
downloaded and the ranker folder the pyfunc names is loaded with ``keeper_core.ranker.load_ranker``.

- ``--merge`` (a fine-tuned ranker only): the tuned tower's adapters are folded into the base
  weights (``TunedRanker.merged_state_dict``) and written as one safetensors file, a full open_clip
  checkpoint that ``keeper embed``, ``keeper pick`` and Serve load as ``ARCH:OUTPUT`` (printed).
  Before anything is written, the checkpoint is loaded back through keeper's own loader and must
  embed a probe batch as the adapter-on tower does: peft has been reported to add an MHA's
  out_proj delta twice when merging, and such a checkpoint is refused, not written. A sidecar
  ``OUTPUT.json`` traces it back: base spec, method, registered name and version, run, tower id
  and the checkpoint's sha256.
- without ``--merge``: the ranker folder (``ranker.json`` + safetensors) is copied to the output
  folder or ``s3://`` prefix, for ``load_ranker`` anywhere, with no registry.

A head ranker has no tower of its own: ``--merge`` on one is an error (it ranks embeddings of its
ModelSpec, which is already a checkpoint anyone can load).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_core.errors import ModelLoadError

#: Probe images (uniform random uint8) the merged checkpoint must embed as the tuned tower does.
PROBE_IMAGES = 8
#: Largest |merged - adapter-on| embedding difference accepted: float32 noise of the merge is
#: ~1e-6 on unit vectors; a double-merged out_proj moves them by ~1e-2 or more.
MERGE_TOLERANCE = 1e-4
CHECKPOINT_SUFFIX = ".safetensors"  # open_clip reads a checkpoint as safetensors by its suffix


class ExportConfig(BaseModel):
    """What ``keeper export`` takes; the CLI's flags map onto these fields."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="models:/NAME@ALIAS, models:/NAME/VERSION, or a logged model URI"
    )
    output: str = Field(
        description="--merge: the checkpoint file (.safetensors, path or s3://); else a folder "
        "or s3:// prefix for the ranker folder"
    )
    merge: bool = Field(False, description="fold a fine-tuned tower into one open_clip checkpoint")
    tracking_uri: str | None = None
    data_dir: str = Field("keeper-data", description="embedded MLflow store when none is set")

    @model_validator(mode="after")
    def _output_fits(self) -> ExportConfig:
        ends = self.output.rstrip("/").endswith(CHECKPOINT_SUFFIX)
        if self.merge and not ends:
            raise ValueError(
                f"a merged checkpoint is one {CHECKPOINT_SUFFIX} file (open_clip picks its reader "
                f"by suffix): output {self.output!r} must end in {CHECKPOINT_SUFFIX}"
            )
        if not self.merge and ends:
            raise ValueError(
                f"without merge the output is a folder for the ranker's files, not "
                f"{self.output!r} (to write one checkpoint, merge)"
            )
        return self


@dataclass(frozen=True)
class ExportResult:
    """What was exported, from which version, and where it went."""

    uri: str
    loaded: str  # models:/NAME/VERSION for a registered version
    name: str | None
    version: str | None
    run_id: str | None
    kind: Literal["head", "fine-tuned"]
    method: str | None  # a fine-tuned ranker's TowerConfig.method
    embedding_spec: str | None  # the tuned tower's id, or the head's embedding ModelSpec
    output: str
    files: list[str]  # every file written (the checkpoint and its sidecar, or the folder's)
    model_spec: str | None = None  # ARCH:OUTPUT that loads a merged checkpoint
    sidecar: str | None = None
    sha256: str | None = None
    max_abs_diff: float | None = None  # merged vs adapter-on tower on the probe batch


# --------------------------------------------------------------------------------------------
# the registered version's ranker


# --------------------------------------------------------------------------------------------
# merging


def probe_pixels(image_size: int, n: int = PROBE_IMAGES) -> Any:
    """A fixed batch of uniform random uint8 images (N, 3, S, S): every pixel value occurs."""
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (n, 3, image_size, image_size), np.uint8)


def check_preprocessing(base_spec: str, merged_spec: str) -> None:
    """The merged spec must prepare images as the base does, or its embeddings would differ.

    (A hub tag can carry its own mean/std; ``ARCH:FILE`` takes the architecture's.)

    Raises:
        ModelLoadError: they differ (both named).
    """
    from keeper_core.models import preprocess_config

    base, merged = preprocess_config(base_spec), preprocess_config(merged_spec)
    if base != merged:
        raise ModelLoadError(
            merged_spec,
            f"would prepare images as {merged}, but the tuned tower's base {base_spec} "
            f"prepares them as {base}: its embeddings would not be the tuned tower's",
        )


def verify_merged(ranker: Any, checkpoint: bytes, arch: str) -> float:
    """Load ``checkpoint`` as ``ARCH:FILE`` through keeper's loader and compare its embeddings of
    the probe batch with the adapter-on tower's; returns the largest absolute difference.

    Raises:
        ModelLoadError: the checkpoint does not load, or differs by ``MERGE_TOLERANCE`` or more.
    """
    import tempfile

    import numpy as np

    from keeper_core.embedding import ClipEmbedder

    pixels = probe_pixels(ranker.image_size)
    with tempfile.TemporaryDirectory(prefix="keeper-export-") as d:
        path = Path(d) / f"merged{CHECKPOINT_SUFFIX}"
        path.write_bytes(checkpoint)
        # CPU, full precision: a bf16 autocast on CUDA would differ by more than the tolerance.
        merged = ClipEmbedder(f"{arch}:{path}", device="cpu").embed_pixels(pixels)
    tuned = ranker.embed_pixels(pixels)
    diff = float(np.abs(merged - tuned).max())
    if not diff < MERGE_TOLERANCE:
        raise ModelLoadError(
            ranker.base_spec,
            f"the merged checkpoint embeds {len(pixels)} probe images up to {diff:.2e} away from "
            f"the adapter-on tower (tolerance {MERGE_TOLERANCE:g}): the merge is wrong (peft has "
            "been reported to add an MHA's out_proj delta twice); refused, nothing written",
        )
    return diff


def merged_checkpoint(ranker: Any, metadata: dict[str, str]) -> bytes:
    """``TunedRanker.merged_state_dict`` as safetensors bytes (``metadata`` in its header)."""
    from safetensors.torch import save

    return bytes(save(ranker.merged_state_dict(), metadata=metadata))


def local_or_s3(output: str) -> str:
    """``output`` as written and named in a spec: ``s3://...`` as given, a path made absolute."""
    from keeper_core import storage

    if storage.is_s3(output):
        return output
    return str(Path(output.removeprefix("file://")).expanduser().resolve())


# --------------------------------------------------------------------------------------------
# the job


def _provenance(ref: Any, ranker: Any) -> dict[str, Any]:
    tower = ranker.config.tower
    return {
        "model_uri": ref.uri,
        "loaded": ref.load_uri,
        "registered_name": ref.name,
        "registered_version": ref.version,
        "alias": ref.alias,
        "run_id": ref.run_id,
        "base_spec": tower.base_spec if tower is not None else None,
        "method": tower.method if tower is not None else None,
        "tower_id": ranker.config.embedding_spec if tower is not None else None,
    }


def export_merged(ref: Any, ranker: Any, output: str) -> ExportResult:
    """Merge, verify, then write the checkpoint and its ``.json`` sidecar.

    Raises:
        DataError: a head ranker (nothing to merge).
        ModelLoadError: the merged checkpoint does not reproduce the tuned tower.
        StorageError: a write failed.
    """
    from keeper_core import storage
    from keeper_core.errors import DataError
    from keeper_core.models import ModelSpec

    cfg = ranker.config
    if cfg.tower is None:
        raise DataError(
            f"nothing to merge: {ref.label()} is a head over embeddings of {cfg.embedding_spec} "
            "(it has no tower of its own; export it without --merge)"
        )
    out = local_or_s3(output)
    arch = ModelSpec.parse(cfg.tower.base_spec).arch
    spec = f"{arch}:{out}"
    check_preprocessing(cfg.tower.base_spec, spec)
    info = _provenance(ref, ranker)
    header = {f"keeper.{k}": str(v) for k, v in info.items() if v is not None}
    data = merged_checkpoint(ranker, header)
    diff = verify_merged(ranker, data, arch)
    sha = hashlib.sha256(data).hexdigest()
    storage.write_bytes(out, data)
    sidecar = out + ".json"
    record = {
        "model_spec": spec,
        **info,
        "sha256": sha,
        "bytes": len(data),
        "probe_images": PROBE_IMAGES,
        "max_abs_diff": diff,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    storage.write_bytes(sidecar, json.dumps(record, indent=2).encode())
    return ExportResult(
        **_identity(ref, ranker),
        output=out,
        files=[out, sidecar],
        model_spec=spec,
        sidecar=sidecar,
        sha256=sha,
        max_abs_diff=diff,
    )


def export_folder(ref: Any, ranker: Any, folder: Path, output: str) -> ExportResult:
    """Copy the ranker folder's files to ``output`` (a folder or ``s3://`` prefix).

    Raises:
        StorageError: a write failed.
    """
    from keeper_core import storage

    out = local_or_s3(output)
    written = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        dst = storage.join(out, f.name)
        storage.write_bytes(dst, f.read_bytes())
        written.append(dst)
    return ExportResult(**_identity(ref, ranker), output=out, files=written)


def _identity(ref: Any, ranker: Any) -> dict[str, Any]:
    tower = ranker.config.tower
    return {
        "uri": ref.uri,
        "loaded": ref.load_uri,
        "name": ref.name,
        "version": ref.version,
        "run_id": ref.run_id,
        "kind": "head" if tower is None else "fine-tuned",
        "method": None if tower is None else tower.method,
        "embedding_spec": ranker.config.embedding_spec,
    }


def run(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg.model`` as ``cfg`` says; ``format_result`` prints the outcome.

    Raises:
        KeeperError: the URI does not resolve or load, nothing to merge, the merge is refused,
            or a write fails.
    """
    import tempfile

    import mlflow

    from keeper_core import registry
    from keeper_core.ranker import load_ranker
    from keeper_train import tracking

    uri = tracking.tracking_uri(cfg.tracking_uri, cfg.data_dir)
    client = mlflow.MlflowClient(uri)
    ref = tracking.resolve_model(client, cfg.model)
    with tempfile.TemporaryDirectory(prefix="keeper-export-") as d:
        folder = registry.download_ranker(client, ref, Path(d))
        ranker = load_ranker(folder, device="cpu")
        if cfg.merge:
            return export_merged(ref, ranker, cfg.output)
        return export_folder(ref, ranker, folder, cfg.output)


def format_result(result: ExportResult) -> str:
    """What ``keeper export`` prints; the last line is what to load."""
    r = result
    what = f"{r.name} version {r.version}" if r.version else r.loaded
    kind = f"{r.kind} ranker" + (f" ({r.method})" if r.method else "")
    lines = [f"{r.uri} -> {what}: {kind}"]
    if r.model_spec is not None:
        lines.append(f"merged checkpoint: {r.output} (sha256 {r.sha256})")
        lines.append(f"verified: max |merged - tuned| = {r.max_abs_diff:.1e} on probe images")
        lines.append(f"provenance: {r.sidecar}")
        lines.append(f"load it as: {r.model_spec}")
    else:
        lines += [f"wrote {f}" for f in r.files]
        lines.append(f"load it with keeper_core.ranker.load_ranker (a copy of {r.output})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the command line: `keeper export` and `python -m keeper_train.jobs.export`


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.export ARGS`` is ``keeper export ARGS``.

    Exit codes: 0 exported, 2 a bad config or input, an unknown model, or a refused merge.
    """
    from keeper_core.cli import main as keeper

    return keeper(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
