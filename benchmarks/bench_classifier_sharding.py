"""Per-device compiled memory of a BroadFace step: classifier replicated vs sharded.

Compile only (nothing is allocated or run), on 8 fake CPU devices. The step is
the real `train_step.build_train_step` (margin loss over batch + queue, Eq. 9
gradient, SGD with momentum on W, enqueue), with a trivial encoder (one Dense
layer on tiny 8x8 images) so that the classifier dominates. For each number
of classes C the step is compiled with W replicated on every device and with
W sharded over all 8 (`config.classifier_sharding='all'`), and
`compiled.memory_analysis()` is read:

* argument / output / alias / temp bytes are **per device** for an SPMD
  executable; the script checks this by comparing the argument bytes with the
  per-device size of the sharded inputs computed from their shardings
  (`sharding.shard_shape`), and stops if they disagree.
* per-device peak estimate = argument + output - alias + temp (the state is
  donated, so outputs alias their inputs).
* "W+momentum" is the classifier's parameter + optimizer state per device
  (from the shardings); "logits" is the size of one f32 logits block of the
  batch plus one of a queue chunk as each device computes them (analytic:
  with W sharded over classes the compiler gathers the rows of every device,
  PartialFC-style, so a device computes [8 x rows, C/8], as many elements as
  [rows, C]); the temp column holds these logits (and their softmax /
  gradient buffers), the W gradient and the gathered embeddings.
* With W sharded over n, the step divides the queue chunk by n
  (`train_step.queue_chunk`), so the gathered queue chunk has the replicated
  run's row count and the queue logits shrink by n too; the batch's own
  logits ([n x batch, C/n] per device) do not.

    python benchmarks/bench_classifier_sharding.py [--classes 85742 360232 2000000]
        [--dim 512] [--batch 128] [--queue 8192] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from broadface_jax import sharding, train_step  # noqa: E402

MiB = 1024 ** 2
IMAGE_SIZE = 8


class TrivialEncoder(nn.Module):
    """Flatten -> Dense(D): a few thousand parameters, so the classifier dominates."""

    embedding_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return nn.Dense(self.embedding_dim)(x.reshape((x.shape[0], -1)))


def make_config(num_classes: int, dim: int, batch: int, queue: int, chunk: int, mode: str):
    """configs/default.py with the sizes of this benchmark."""
    from configs import default

    c = default.get_config()
    c.num_classes = num_classes
    c.model.embedding_dim = dim
    c.per_device_batch_size = batch
    c.image_size = IMAGE_SIZE
    c.queue.size_per_device = queue
    c.queue.chunk_size = chunk
    c.classifier_sharding = mode
    return c


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` laid out by `shardings` (from shard shapes)."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = sh.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def measure(num_classes: int, dim: int, batch: int, queue: int, chunk: int, mode: str) -> dict:
    config = make_config(num_classes, dim, batch, queue, chunk, mode)
    mesh = sharding.make_mesh(config.mesh)
    model = TrivialEncoder(dim)
    abstract, shardings = train_step.abstract_train_state(config, mesh, model=model)
    step = train_step.make_train_step(config, mesh, shardings, model=model)
    n = mesh.size
    batch_abs = {"image": jax.ShapeDtypeStruct((batch * n, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
                 "label": jax.ShapeDtypeStruct((batch * n,), jnp.int32)}
    batch_sh = {"image": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)}
    t0 = time.perf_counter()
    mem = step.lower(abstract, batch_abs).compile().memory_analysis()
    compile_s = time.perf_counter() - t0

    want_args = per_device_bytes(abstract, shardings) + per_device_bytes(batch_abs, batch_sh)
    if mem.argument_size_in_bytes != want_args:
        raise RuntimeError(
            f"memory_analysis argument bytes {mem.argument_size_in_bytes} differ from the "
            f"per-device input size {want_args} (C={num_classes}, {mode}): not per device?")
    kernel = abstract.params["classifier"]["kernel"]
    kernel_sh = shardings.params["classifier"]["kernel"]
    w_bytes = per_device_bytes([kernel], [kernel_sh])
    shards = sharding.classifier_shards(mesh, mode)
    q_chunk = train_step.queue_chunk(config, mesh)
    rows = (batch + min(q_chunk or queue, queue)) * shards  # gathered over the class shards
    return dict(
        C=num_classes, mode=mode, chunk=q_chunk, c_pad=kernel.shape[0],
        w_opt=2 * w_bytes,  # W + SGD momentum (same shape and sharding)
        logits=rows * (kernel.shape[0] // shards) * 4,
        args=mem.argument_size_in_bytes, out=mem.output_size_in_bytes,
        alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
        peak=(mem.argument_size_in_bytes + mem.output_size_in_bytes
              - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
        compile_s=compile_s)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[85_742, 360_232, 2_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="per device")
    p.add_argument("--queue", type=int, default=8192, help="queue rows per device")
    p.add_argument("--chunk", type=int, default=2048, help="queue rows per chunk per device")
    args = p.parse_args(argv)

    print(f"# {' '.join(['python'] + sys.argv)}")
    print(f"# {jax.device_count()} x {jax.devices()[0].platform} devices, jax {jax.__version__}; "
          f"D={args.dim}, batch {args.batch}/device, queue {args.queue}/device "
          f"(chunk {args.chunk}), trivial encoder on {IMAGE_SIZE}x{IMAGE_SIZE} images")
    print("# MiB per device (memory_analysis of the SPMD executable; argument bytes "
          "checked against the per-device input size)")
    header = (f"| {'C':>9} | {'W':>10} | {'chunk':>5} | {'W+momentum':>10} | {'logits':>8} | "
              f"{'arguments':>9} | "
              f"{'outputs':>8} | {'aliased':>8} | {'temp':>8} | {'peak est.':>9} | "
              f"{'compile s':>9} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    rows = []
    for c in args.classes:
        for mode in ("replicated", "all"):
            r = measure(c, args.dim, args.batch, args.queue, args.chunk, mode)
            chunk = r["chunk"]
            rows.append(r)
            print(f"| {c:>9,} | {('sharded/8' if mode == 'all' else 'replicated'):>10} | "
                  f"{chunk:>5} | {r['w_opt'] / MiB:>10.1f} | {r['logits'] / MiB:>8.1f} | "
                  f"{r['args'] / MiB:>9.1f} | "
                  f"{r['out'] / MiB:>8.1f} | {r['alias'] / MiB:>8.1f} | "
                  f"{r['temp'] / MiB:>8.1f} | {r['peak'] / MiB:>9.1f} | "
                  f"{r['compile_s']:>9.1f} |", flush=True)
    print("\n# sharded / replicated per device")
    print(f"| {'C':>9} | {'chunk':>5} | {'W+momentum':>10} | {'logits':>6} | {'temp':>6} | "
          f"{'peak est.':>9} |")
    print(f"|{'-' * 11}|{'-' * 7}|{'-' * 12}|{'-' * 8}|{'-' * 8}|{'-' * 11}|")
    for c in args.classes:
        rep = next(r for r in rows if r["C"] == c and r["mode"] == "replicated")
        for shd in (r for r in rows if r["C"] == c and r["mode"] == "all"):
            print(f"| {c:>9,} | {shd['chunk']:>5} | {shd['w_opt'] / rep['w_opt']:>10.3f} | "
                  f"{shd['logits'] / rep['logits']:>6.3f} | {shd['temp'] / rep['temp']:>6.3f} | "
                  f"{shd['peak'] / rep['peak']:>9.3f} |")


if __name__ == "__main__":
    main()
