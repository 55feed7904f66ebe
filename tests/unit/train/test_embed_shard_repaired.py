"""A WebDataset shard cut short is recorded as failed under its own URI; once it is whole again,
its images are inputs and the shard is none: its failure leaves the errors table (it stayed for
ever, counted in the failed fraction: the job held at exit 3, whatever was re-run)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from keeper_train.jobs import embed


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def shard(n: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            for ext, data in (("jpg", jpeg(i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_shard_whole_again_is_no_failure(tmp_path: Path) -> None:
    (tmp_path / "wds").mkdir()
    path = tmp_path / "wds" / "00000.tar"
    whole = shard(12)
    path.write_bytes(whole[: len(whole) * 2 // 3])  # a download cut short
    cfg = embed.EmbedConfig(input=f"{tmp_path / 'wds'}/", output=str(tmp_path / "out"))
    first = embed.plan(cfg)
    assert first.index_failures.keys() == {str(path)}
    embed.record_planned_failures(first)
    assert embed.plan(cfg).errors.uris() == {str(path)}  # still cut short: still failed

    path.write_bytes(whole)  # downloaded again, whole
    again = embed.plan(cfg)
    assert again.index_failures == {}
    assert again.errors_cleared == 1
    assert again.errors.uris() == set()
    assert len(again.todo) == 12
