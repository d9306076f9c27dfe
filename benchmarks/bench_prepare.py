"""Preparation rate: single process vs Apache Beam's DirectRunner, and what one core feeds.

Writes one insightface-layout train.rec / train.idx of --images 112x112 JPEG
faces (smooth random images with noise, ~5 KB each at quality 90, 1,000
identities), then, on the same file, in one run:

  * `prepare --dataset insightface_rec` in this process (TFDS's generator path);
  * the same with `--beam_runner=DirectRunner --beam_workers=W` for each W of
    --workers (1: Beam in this process, `in_memory`; > 1: W worker
    processes, `multi_processing`);
  * the training pipeline (`input_pipeline.create_train_iterator`, batch
    --batch, flip, normalise) reading the single-process result, in a child
    process pinned to one core (os.sched_setaffinity): images/s per core.

images/s = images prepared / wall time of `prepare.prepare` (listing, reading,
full decode check, encoding, TFDS shuffle and ArrayRecord write; Python and
TensorFlow start-up excluded, Beam worker start-up included). Needs the
`beam` extra for the Beam rows.

    python benchmarks/bench_prepare.py [--images 50000] [--workers 1,2] [--batch 256]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_rec(root: pathlib.Path, n: int, identities: int = 1000, seed: int = 0) -> float:
    """n 112x112 JPEG faces in `identities` identities -> seconds it took."""
    from PIL import Image

    from broadface_jax.datasets import recordio

    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, identities, n))
    labels[:min(n, identities)] = np.arange(min(n, identities))
    labels = np.sort(labels)
    start = time.perf_counter()
    images = []
    for label in labels:
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((112, 112), Image.Resampling.BICUBIC), np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        images.append((float(label), buf.getvalue()))
    root.mkdir(parents=True, exist_ok=True)
    recordio.write_face_rec(root / "train.rec", root / "train.idx", images, num_classes=identities)
    return time.perf_counter() - start


def time_prepare(raw: pathlib.Path, data_dir: pathlib.Path, workers: int | None) -> float:
    from broadface_jax import prepare

    start = time.perf_counter()
    if workers is None:
        prepare.prepare("insightface_rec", str(raw), str(data_dir))
    else:
        prepare.prepare("insightface_rec", str(raw), str(data_dir), beam_runner="DirectRunner",
                        beam_workers=workers)
    return time.perf_counter() - start


def pipeline_child(data_dir: str, batch: int, batches: int, warmup: int) -> None:
    """Runs in a child pinned to one core: prints {"images_per_s": ...} as JSON."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from broadface_jax import input_pipeline
    from configs.default import get_config

    c = get_config()
    c.seed, c.per_device_batch_size, c.image_size, c.num_classes = 0, batch, 112, 0
    c.dataset.name, c.dataset.tfds_name, c.dataset.data_dir = "tfds", "insightface_rec", data_dir
    it = input_pipeline.create_train_iterator(c)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = sum(len(next(it)["label"]) for _ in range(batches))
    rate = n / (time.perf_counter() - start)
    it.close()
    print(json.dumps({"images_per_s": rate, "cores": len(os.sched_getaffinity(0))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--workers", default="1,2", help="DirectRunner worker counts, comma-separated")
    parser.add_argument("--batch", type=int, default=256, help="training pipeline batch")
    parser.add_argument("--batches", type=int, default=40, help="timed pipeline batches")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--pipeline_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_child:
        pipeline_child(args.pipeline_child, args.batch, args.batches, args.warmup)
        return

    import jax  # noqa: F401  (the same start-up as the command)

    from broadface_jax import input_pipeline

    input_pipeline.hide_gpus_from_tensorflow()
    tmp = pathlib.Path(args.tmp or tempfile.mkdtemp(prefix="bench_prepare_"))
    raw = tmp / "raw"
    made = write_rec(raw, args.images)
    size_mb = (raw / "train.rec").stat().st_size / 2**20
    rows = []
    secs = time_prepare(raw, tmp / "single", None)
    rows.append(("single process (generator)", secs))
    for w in [int(x) for x in args.workers.split(",") if x]:
        out = tmp / f"beam{w}"
        secs = time_prepare(raw, out, w)
        rows.append((f"DirectRunner, {w} worker{'s' if w > 1 else ''}"
                     f" ({'in_memory' if w == 1 else 'multi_processing'})", secs))
        shutil.rmtree(out, ignore_errors=True)
    child = subprocess.run([sys.executable, __file__, "--pipeline_child", str(tmp / "single"),
                            "--batch", str(args.batch), "--batches", str(args.batches),
                            "--warmup", str(args.warmup)], capture_output=True, text=True, check=True)
    pipe = json.loads(child.stdout.strip().splitlines()[-1])

    print(f"\n{args.images} images, 112x112 JPEG q90, train.rec {size_mb:.0f} MB "
          f"(written in {made:.0f} s); {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"| preparation | wall s | images/s | vs single |")
    print(f"| --- | ---: | ---: | ---: |")
    base = rows[0][1]
    for name, secs in rows:
        print(f"| {name} | {secs:.1f} | {args.images / secs:,.0f} | {base / secs:.2f}x |")
    print(f"| training pipeline reading it, 1 core (batch {args.batch}) | - | "
          f"{pipe['images_per_s']:,.0f} | - |")
    print(f"\ncommand: python benchmarks/{pathlib.Path(__file__).name} --images {args.images} "
          f"--workers {args.workers} --batch {args.batch} --batches {args.batches}")
    if not args.tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
