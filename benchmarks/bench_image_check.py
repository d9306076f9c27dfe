"""What the full decode check of data preparation costs per image.

``broadface_jax.datasets.common.face_jpeg`` checks every image before it is
written: PIL ``verify()`` and a full ``load()`` (a truncated file or one that
is not an image), then, for JPEGs, a second decode by TensorFlow's libjpeg
with its warnings captured (damaged scan data, which PIL accepts silently).
This times, on aligned 112x112 JPEG faces (textured random images, quality
95, as insightface's .rec files hold), the median per-image time of

  pil        PIL verify + load only (the check before this change: load only)
  full       face_jpeg as it is (PIL + the libjpeg scan check)
  scan only  common.jpeg_scan_warning alone

over ``--images`` images, the three interleaved image by image so machine
noise hits them alike (the ratio is within one run).

    python benchmarks/bench_image_check.py [--images 2000]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _faces(n: int, rng) -> list[bytes]:
    from PIL import Image

    out = []
    for _ in range(n):
        x = np.clip(np.cumsum(rng.normal(0, 8, (112, 112, 3)), axis=1) + 128, 0, 255)
        buf = io.BytesIO()
        Image.fromarray(x.astype(np.uint8)).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    from PIL import Image

    from broadface_jax.datasets import common

    def pil(data):
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()

    checks = {"pil": pil, "full": lambda d: common.face_jpeg(d, "bench"),
              "scan only": common.jpeg_scan_warning}
    faces = _faces(args.images, np.random.default_rng(0))
    for data in faces[:20]:  # warm-up (TensorFlow's first op)
        for check in checks.values():
            check(data)
    times: dict[str, list[float]] = {name: [] for name in checks}
    for data in faces:
        for name, check in checks.items():
            t0 = time.perf_counter()
            check(data)
            times[name].append(time.perf_counter() - t0)
    print(f"command: python benchmarks/bench_image_check.py --images {args.images}")
    print(f"{args.images} JPEG faces 112x112, {np.mean([len(f) for f in faces]) / 1024:.1f} KiB "
          "each on average; median per image")
    print("| check | median µs / image | images / s (one core) | vs pil |")
    print("| --- | --- | --- | --- |")
    base = float(np.median(times["pil"]))
    for name, values in times.items():
        med = float(np.median(values))
        print(f"| {name} | {med * 1e6:.0f} | {1 / med:,.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
