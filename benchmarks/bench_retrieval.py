"""Image retrieval (paper section 4.3): the 224x224 input pipeline next to the ResNet-50 step, and memory.

1. Input pipeline: a synthetic SOP-layout data set (random JPEGs of SOP-like
   sizes, 300-640 px on a side) is prepared with the `sop` builder into a
   temporary folder, then read through `create_train_iterator` with the
   retrieval config (decode + resize to 256^2 + random resized crop to 224 +
   flip + ImageNet normalisation): images/s after warm-up. Also the
   evaluation view (decode + resize + centre crop, uint8) through the `sop`
   Recall@K target's reader.
2. Train step: the full ResNet-50 step of `configs/retrieval.py:sop`
   (224x224, D=512, 11,318 classes) with the queue off (ArcFace) and at
   32,000 (BroadFace) on one CPU device at a small batch, seconds per step
   after compilation. At a small batch the queue's logits (32,000 x 11,318
   x 512, forward and dW) cost more than the ResNet-50 itself.
3. Memory (compile only, one device, `compiled.memory_analysis()`): the
   ResNet-50 BroadFace step with batch 128 and a 32,000 queue against plain
   ArcFace steps with batch 128, 256 and 128 + 32,000 (the same number of
   instances as BroadFace refers to): the Fig. 6 analogue for retrieval.

    python benchmarks/bench_retrieval.py [--images 512] [--batches 8] [--step_batch 8] [--step_queues 0,32000] [--skip_step] [--skip_memory]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import runpy
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1024 ** 3


def retrieval_config(arg: str = "sop"):
    return runpy.run_path(str(ROOT / "configs" / "retrieval.py"))["get_config"](arg)


def write_sop_like(root: pathlib.Path, num_images: int, seed: int = 0) -> None:
    """SOP layout: Ebay_train.txt / Ebay_test.txt, JPEGs of 300-640 px sides (quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:640, 0:640]
    # smooth colour fields + noise: JPEG sizes like photos rather than pure noise
    textures = [np.clip(127 + 80 * np.sin(xx[..., None] / rng.uniform(10, 60) + rng.uniform(0, 6, 3))
                        + 40 * np.cos(yy[..., None] / rng.uniform(10, 60)), 0, 255) for _ in range(8)]
    base = root / "Stanford_Online_Products"
    per_class = 4
    image_id = 1
    for split, n in (("train", num_images), ("test", max(per_class * 8, num_images // 8))):
        lines = ["image_id class_id super_class_id path"]
        first_class = 1 if split == "train" else 1 + num_images // per_class + 1
        for i in range(n):
            c = first_class + i // per_class
            rel = f"chair_final/{c}_{i % per_class}.JPG"
            h, w = int(rng.integers(300, 641)), int(rng.integers(300, 641))
            img = textures[i % len(textures)][:h, :w] + rng.normal(0, 8, (h, w, 3))
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(base / rel, quality=90)
            lines.append(f"{image_id} {c} 1 {rel}")
            image_id += 1
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")


def bench_pipeline(data_dir: str, batches: int, warmup: int) -> tuple[float, float, int]:
    from broadface_jax import input_pipeline
    from broadface_jax.evaluation import retrieval_targets

    c = retrieval_config("sop")
    c.dataset.data_dir = data_dir
    c.per_device_batch_size = 128
    c.num_classes = 10 ** 6  # labels unchecked here
    it = input_pipeline.create_train_iterator(c)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = sum(len(next(it)["label"]) for _ in range(batches))
    train_rate = n / (time.perf_counter() - t0)
    it.close()

    evaluator = retrieval_targets.build_evaluator("sop", c)
    from broadface_jax import datasets
    builder = datasets.get_builder("sop", data_dir)
    t0, m = time.perf_counter(), 0
    source = evaluator.source(builder, "train")  # the evaluators' TFDS source
    for images, _ in source.batches(0, len(source), evaluator.batch_size):
        m += images.shape[0]
    eval_rate = m / (time.perf_counter() - t0)
    return train_rate, eval_rate, m


def bench_step(batch: int, steps: int, queue: int) -> tuple[float, float]:
    import jax

    from broadface_jax import sharding, train_step

    c = retrieval_config("sop")
    c.per_device_batch_size = batch
    c.queue.size_per_device = queue
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    state, sh = train_step.create_train_state(c, mesh, jax.random.PRNGKey(0))
    step = train_step.make_train_step(c, mesh, sh)
    rng = np.random.default_rng(0)
    host = {"image": rng.normal(size=(batch, 224, 224, 3)).astype(np.float32),
            "label": rng.integers(0, c.num_classes, batch).astype(np.int32)}
    t0 = time.perf_counter()
    state, metrics = step(state, sharding.shard_batch(host, mesh))
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, sharding.shard_batch(host, mesh))
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / steps, compile_and_first


def bench_memory(rows):
    import jax
    import jax.numpy as jnp

    from broadface_jax import sharding, train_step

    out = []
    for kind, batch, queue in rows:
        c = retrieval_config("sop")
        c.per_device_batch_size = batch
        c.queue.size_per_device = queue
        mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
        t0 = time.time()
        abstract, sh = train_step.abstract_train_state(c, mesh)
        step = train_step.make_train_step(c, mesh, sh)
        spec = {"image": jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
        mem = step.lower(abstract, spec).compile().memory_analysis()
        out.append((kind, batch, queue, batch + queue, mem.temp_size_in_bytes / GB,
                    (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / GB, time.time() - t0))
        print(f"  compiled {kind} batch={batch} queue={queue} in {out[-1][-1]:.0f}s", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="training images of the synthetic SOP")
    p.add_argument("--batches", type=int, default=8, help="timed pipeline batches of 128")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--step_batch", type=int, default=8, help="batch of the timed ResNet-50 step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step_queues", default="0,32000", help="queue sizes of the timed steps")
    p.add_argument("--skip_step", action="store_true")
    p.add_argument("--skip_memory", action="store_true")
    args = p.parse_args(argv)
    print("command: python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])))
    import jax

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, load average "
          f"{os.getloadavg()[0]:.1f} at the start\n")

    from broadface_jax import prepare

    with tempfile.TemporaryDirectory() as tmp:
        raw, data = pathlib.Path(tmp) / "raw", pathlib.Path(tmp) / "tfds"
        t0 = time.perf_counter()
        write_sop_like(raw, args.images)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        builder = prepare.prepare("sop", str(raw), str(data))
        n_prep = sum(s.num_examples for s in builder.info.splits.values())
        t_prep = time.perf_counter() - t0
        train_rate, eval_rate, n_eval = bench_pipeline(str(data), args.batches, args.warmup)
    print(f"synthetic SOP: {args.images} training JPEGs 300-640 px (written in {t_write:.0f}s); "
          f"prepare: {n_prep / t_prep:.0f} images/s ({n_prep} images)")
    print(f"{'stage':<62} {'images/s':>9}")
    print(f"{'train pipeline: decode + resize 256 + random resized crop 224 + flip':<62} {train_rate:>9.0f}")
    print(f"{'eval view: decode + resize 256 + centre crop 224 (uint8), ' + str(n_eval) + ' images':<62} "
          f"{eval_rate:>9.0f}")

    if not args.skip_step:
        print(f"\nResNet-50 step (224, D=512, C=11,318), batch {args.step_batch}, 1 CPU device:")
        for queue in (int(q) for q in args.step_queues.split(",")):
            sec, first = bench_step(args.step_batch, args.steps, queue)
            print(f"  queue {queue:>6,}: {sec:.2f} s/step = {args.step_batch / sec:.2f} images/s "
                  f"(compile + first step {first:.0f}s)", flush=True)

    if not args.skip_memory:
        print("\nCompiled memory (compile only, one device), ResNet-50 224, D=512, C=11,318:")
        rows = bench_memory([("broadface", 128, 32_000), ("plain", 128, 0), ("plain", 256, 0),
                             ("plain", 128 + 32_000, 0)])
        print(f"{'step':>10} {'images':>7} {'queue':>7} {'instances':>10} {'temp GiB':>9} {'args+temp GiB':>14}")
        for kind, b, q, inst, temp, total, _ in rows:
            print(f"{kind:>10} {b:>7} {q:>7} {inst:>10} {temp:>9.2f} {total:>14.2f}")


if __name__ == "__main__":
    main()
