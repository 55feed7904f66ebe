"""Colour conversion on the GPU equals littlecms: keeper_core.color.MatrixProfile on a device.

    python benchmarks/gpu/icc_check.py [--device cuda]

The GPU decoders convert Display P3, Adobe RGB and ProPhoto RGB JPEGs to sRGB on the device with
``MatrixProfile.to_srgb`` (littlecms's fixed-point arithmetic in int32 torch ops). CI has no GPU,
so its tests run that code on CPU tensors; this runs it on the device: 1M random pixels per
profile on the device against the same on the CPU and against littlecms (PIL.ImageCms), then a
tagged JPEG through ``GpuDecoder`` against ``decode_image``. Prints one line per check and exits
1 on any difference (``--device cpu`` runs the same checks here).
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np
import torch
from PIL import Image

from keeper_core.color import (
    ADOBE_RGB,
    DISPLAY_P3,
    PROPHOTO_RGB,
    convert_to_srgb,
    matrix_profile,
    rgb_profile,
    srgb_transform,
)
from keeper_core.decoders import GpuDecoder
from keeper_core.images import decode_image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    failures = 0
    for space in (DISPLAY_P3, ADOBE_RGB, PROPHOTO_RGB):
        icc = rgb_profile(space)
        matrix = matrix_profile(icc)
        assert matrix is not None, space.name
        pixels = rng.integers(0, 256, size=(3, 1024, 1024), dtype=np.uint8)
        on_cpu = matrix.to_srgb(torch.from_numpy(pixels)).numpy()
        on_dev = matrix.to_srgb(torch.from_numpy(pixels).to(args.device)).cpu().numpy()
        transform = srgb_transform({"icc_profile": icc}, "RGB")
        assert transform is not None
        lcms = np.asarray(convert_to_srgb(Image.fromarray(pixels.transpose(1, 2, 0)), transform))
        d_cpu = int(np.abs(on_dev.astype(int) - on_cpu).max())
        d_lcms = int(np.abs(on_dev.transpose(1, 2, 0).astype(int) - lcms).max())
        ok = d_cpu == 0 and d_lcms <= 1
        failures += not ok
        print(
            f"to_srgb {space.name:18} {args.device}: max |device - cpu| {d_cpu}, "
            f"max |device - littlecms| {d_lcms}: {'ok' if ok else 'DIFFERENT'}"
        )
    photo = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=95, icc_profile=rgb_profile(DISPLAY_P3))
    data = buf.getvalue()
    reference = np.asarray(decode_image(data))
    gpu = GpuDecoder(device=args.device)
    (out,) = gpu.decode_batch([(data, "p3.jpg")])
    if isinstance(out, Exception):
        print(f"GpuDecoder {args.device}: {out!r}: FAILED")
        return 1
    image = out[0] if isinstance(out, tuple) else out
    got = image.permute(1, 2, 0).cpu().numpy()
    d = int(np.abs(got.astype(int) - reference).max())
    # nvJPEG's IDCT is not libjpeg-turbo's: a few levels apart before any conversion.
    ok = gpu.color_converted == 1 and not gpu.delegated and d <= 8
    failures += not ok
    print(
        f"GpuDecoder {args.device}: P3 JPEG converted {gpu.color_converted}, delegated "
        f"{dict(gpu.delegated)}, max |gpu - decode_image| {d}: {'ok' if ok else 'DIFFERENT'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
