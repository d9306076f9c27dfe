"""Input-pipeline throughput: images/s of read + decode + flip + normalise.

Sources:
  * lfw: LFW dev_train (6,671 faces) prepared with the `lfw` builder into a
    temporary data_dir (or --data_dir), read through `create_train_iterator`;
  * synthetic: the synthetic identities through `create_train_iterator`;
  * synthetic render: `synthetic.render` alone, on one core (no tf.data).
Also reports how long preparing LFW took.

    python benchmarks/bench_input_pipeline.py [--batch 128] [--batches 30] [--data_dir DIR]

Keep it short on shared machines: the defaults run for about a minute or two.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broadface_jax import input_pipeline  # noqa: E402
from broadface_jax.datasets import synthetic  # noqa: E402
from configs.default import get_config  # noqa: E402


def _time_iterator(config, batches: int, warmup: int) -> float:
    """images/s over `batches` batches after `warmup` batches."""
    it = input_pipeline.create_train_iterator(config)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["label"])
    rate = n / (time.perf_counter() - start)
    it.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="per-process batch (1 CPU device)")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per source")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data_dir", default="", help="reuse a prepared TFDS data_dir (lfw)")
    parser.add_argument("--lfw_root", default=str(ROOT.parent / "shared" / "data" / "lfw"))
    args = parser.parse_args()

    import jax
    rows = []
    tmp = None
    data_dir = args.data_dir
    prep_rate = None
    if not data_dir:
        tmp = tempfile.TemporaryDirectory()
        data_dir = tmp.name
    from broadface_jax import prepare
    start = time.perf_counter()
    builder = prepare.prepare("lfw", args.lfw_root, data_dir)
    n_lfw = builder.info.splits["dev_train"].num_examples
    if not args.data_dir:
        prep_rate = n_lfw / (time.perf_counter() - start)

    c = get_config()
    c.per_device_batch_size = args.batch // jax.local_device_count()
    c.image_size = 112
    c.num_classes = 0  # from the prepared data set's metadata
    c.dataset.name = "tfds"
    c.dataset.tfds_name = "lfw"
    c.dataset.split = "dev_train"
    c.dataset.data_dir = data_dir
    rows.append(("lfw dev_train (JPEG decode)", 112, _time_iterator(c, args.batches, args.warmup)))

    c.dataset.name = "synthetic"
    c.num_classes = 1000
    c.dataset.synthetic.num_identities = 1000
    c.dataset.synthetic.heldout_identities = 100
    c.dataset.synthetic.samples_per_identity = 50
    for size in (112, 64):
        c.image_size = size
        rows.append(("synthetic (tf.data)", size, _time_iterator(c, args.batches // 2, 2)))
        spec = synthetic.spec_from_config(c)
        synthetic.training_examples(spec, np.arange(args.batch), 0)
        start = time.perf_counter()
        reps = 3
        for r in range(reps):
            synthetic.training_examples(spec, np.arange(args.batch) + 7919 * (r + 1), 0)
        rows.append(("synthetic render only (1 core)", size, reps * args.batch / (time.perf_counter() - start)))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ninput pipeline throughput, batch {args.batch}, {os.cpu_count()} CPU cores, "
          f"load average at the end {load} (other jobs share the cores)")
    print("| source | image size | images/s |")
    print("| --- | --- | --- |")
    for name, size, rate in rows:
        print(f"| {name} | {size} | {rate:,.0f} |")
    if prep_rate is not None:
        print(f"| prepare lfw dev_train ({n_lfw} faces: read, crop, JPEG encode, write) | 112 | {prep_rate:,.0f} |")
    print("\ncommand: python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
