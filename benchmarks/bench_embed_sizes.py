"""Whole `python -m broadface_jax.embed` processes on a few to many images: does a handful cost a handful?

    python benchmarks/bench_embed_sizes.py --workdir runs/r50 [--sizes 20,100,256,1000] \\
        [--rounds 2] [--images DIR]

``--workdir``: a run (its config.json says the model; the issue's is an
IResNet-50, width 1.0, image_size 112, D 512, eval.batch_size 256, trained
one step:
``python -m broadface_jax.main --config configs/demo.py:smoke
--config.model.name=iresnet50 --config.model.width=1.0 --config.image_size=112
--config.model.embedding_dim=512 --config.eval.batch_size=256
--config.eval.targets='()' --config.total_steps=1 --config.checkpoint_every_steps=1
--workdir runs/r50``). Random 112x112 faces are written to a temporary folder
(or ``--images``: a folder with at least max(sizes) images); each size embeds
the first N through a list file, flip on, as a user runs it. The sizes run
interleaved (round r runs them in rotated order), sizes above 256 only in
the first round (``--big_once``, default on: they take minutes on a CPU), so a
shared, loaded machine slows all sizes alike; the table gives each run's wall
time (process start to exit: imports, restore, compile and embedding), the
median per size and its ratio to the median of 256.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_faces(folder: str, count: int, size: int = 112, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:05d}.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sizes", default="20,100,256,1000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", default=None)
    parser.add_argument("--big_once", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench_embed_")
    images = args.images or os.path.join(tmp, "faces")
    if args.images is None:
        write_faces(images, max(sizes))
    names = sorted(f for f in os.listdir(images) if f.endswith((".png", ".jpg")))
    if len(names) < max(sizes):
        sys.exit(f"--images={images}: {len(names)} images, need {max(sizes)}")
    lists = {}
    for n in sizes:
        lists[n] = os.path.join(tmp, f"list_{n}.txt")
        with open(lists[n], "w", encoding="utf-8") as f:
            f.write("".join(os.path.join(os.path.abspath(images), x) + "\n" for x in names[:n]))
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for r in range(args.rounds):
        order = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
        for n in order:
            if r > 0 and args.big_once and n > 256:
                continue
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "broadface_jax.embed", "--workdir",
                                   args.workdir, "--images", lists[n], "--out",
                                   os.path.join(tmp, f"out_{n}.npz")],
                                  capture_output=True, text=True)
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"embed of {n} images failed:\n{proc.stderr[-3000:]}")
            times[n].append(elapsed)
            print(f"round {r}: {n} images {elapsed:.1f} s", file=sys.stderr, flush=True)
    ref = statistics.median(times[256]) if 256 in times and times[256] else None
    print("| images | runs (s) | median (s) | / median of 256 |")
    print("|-------:|----------|-----------:|----------------:|")
    for n in sizes:
        med = statistics.median(times[n])
        ratio = f"{med / ref:.2f}" if ref else "-"
        print(f"| {n} | {', '.join(f'{t:.1f}' for t in times[n])} | {med:.1f} | {ratio} |")
    print(f"\ncommand: python benchmarks/bench_embed_sizes.py --workdir {args.workdir} "
          f"--sizes {args.sizes} --rounds {args.rounds}"
          + ("" if args.big_once else " --no-big_once"))


if __name__ == "__main__":
    main()
