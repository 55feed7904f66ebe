"""keeper's Pillow-only resize/crop equals open_clip's eval transform pixel for pixel, and the CPU
decode path (keeper embed's decode tasks) runs without importing torch or open_clip."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keeper_core.models import (
    PreprocessConfig,
    image_transform,
    preprocess_config,
    resize_transform,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# landscape, portrait, square, odd sides, smaller than the model's input (upscaled or padded),
# one side shorter, a thin strip
SIZES = [(320, 240), (240, 320), (224, 224), (333, 197), (97, 61), (50, 50), (640, 100), (7, 300)]


def _open_clip_geometric(
    size: int, interpolation: str, mode: str, image: Image.Image
) -> np.ndarray:
    """open_clip's own eval transform, every step before ToTensor (the reference)."""
    import open_clip

    full = open_clip.image_transform(
        size, is_train=False, mean=MEAN, std=STD, interpolation=interpolation, resize_mode=mode
    )
    for t in full.transforms:
        if type(t).__name__ in ("ToTensor", "MaybeToTensor", "Normalize"):
            break
        image = t(image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_equals_open_clip_pixel_for_pixel(mode: str, interpolation: str) -> None:
    rng = np.random.default_rng(0)
    for size in (32, 64):
        ours = resize_transform(PreprocessConfig(size, MEAN, STD, interpolation, mode))
        for w, h in SIZES:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            got = ours(image)
            assert got.shape == (3, size, size)
            assert got.dtype == np.uint8
            want = _open_clip_geometric(size, interpolation, mode, image)
            assert np.array_equal(got, want), (mode, interpolation, size, (w, h))


def test_a_spec_and_its_config_give_the_same_transform_and_the_full_transform_agrees() -> None:
    """From a spec string too; and uint8 / 255, normalised, is open_clip's full eval transform."""
    import torch

    spec = "keeper-tiny:random"
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 130, 3), np.uint8))
    a, b = resize_transform(spec)(image), resize_transform(preprocess_config(spec))(image)
    assert np.array_equal(a, b)
    p = preprocess_config(spec)
    mine = (torch.from_numpy(a).float() / 255 - torch.tensor(p.mean)[:, None, None]) / torch.tensor(
        p.std
    )[:, None, None]
    assert torch.allclose(mine, image_transform(spec)(image), atol=1e-6)


def test_an_unknown_resize_mode_is_refused() -> None:
    from keeper_core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="resize_mode 'stretch'"):
        resize_transform(PreprocessConfig(32, MEAN, STD, "bicubic", "stretch"))


def test_the_embed_jobs_decode_task_imports_neither_torch_nor_open_clip(tmp_path: Path) -> None:
    """What a Ray decode worker runs: import the job's module, prepare a batch with the driver's
    preprocess config. A fresh interpreter, so nothing this test process imported counts."""
    for i in range(2):
        arr = np.random.default_rng(i).integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{i}.jpg", quality=90)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "pre.pkl").write_bytes(pickle.dumps(preprocess_config("keeper-tiny:random")))
    script = f"""
import json, pickle, sys
import numpy as np
from keeper_train.jobs.embed import prepare_batch
d = {str(tmp_path)!r}
out = prepare_batch(
    {{"image_uri": np.array([d + "/0.jpg", d + "/1.jpg", d + "/bad.jpg"], dtype=object)}},
    spec="keeper-tiny:random",
    limits={{"max_pixels": 10**7, "max_bytes": 10**7, "max_raw_bytes": 10**7, "min_side": 8}},
    draft=True, errors_dir=d + "/errors", run_id="r",
    preprocess=pickle.load(open(d + "/pre.pkl", "rb")),
)
heavy = [m for m in ("torch", "torchvision", "open_clip") if m in sys.modules]
print(json.dumps({{"shape": list(out["pixel_values"].shape), "heavy": heavy}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"shape": [2, 3, 64, 64], "heavy": []}
    assert list((tmp_path / "errors").glob("*.parquet"))  # the bad file was recorded
