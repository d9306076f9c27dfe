"""Compiled memory of the BroadFace classifier side, and the paper's Fig. 6 analogue.

Compile only (nothing is run), on one CPU device, with XLA's
`compiled.memory_analysis()`:

1. Classifier-side step (Eq. 9 loss + gradient w.r.t. W + SGD update) for
   Q = 32,768 queue rows, C = 85,742 classes, D = 512, batch 128: temp bytes
   chunked (config.queue.chunk_size rows at a time) versus unchunked, and the
   chunked temp as Q doubles.
2. Fig. 6 analogue: memory of a full BroadFace step (IResNet-100 at 112x112,
   batch 128 + queue Q) against a plain step with batch 128 + Q images.

    python benchmarks/bench_queue_memory.py [--fig6] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from broadface_jax import losses, queue as queue_lib  # noqa: E402

GB = 1024 ** 3


def classifier_side(q: int, c: int, d: int, b: int, chunk: int):
    """Lowered, compiled Eq. 9 classifier update; returns memory_analysis()."""
    loss = losses.build({"name": "arcface", "s": 64.0})

    def step(kernel, momentum, queue, emb, labels):
        def loss_fn(kernel):
            kn = losses.l2_normalize(kernel)
            q_sum, _, n = queue_lib.queue_loss_sum(queue, kernel, kn, loss, chunk_size=chunk)
            batch = jnp.sum(loss.per_example(emb, kn, labels))
            return (batch + q_sum) / (b + n)
        g = jax.grad(loss_fn)(kernel)
        momentum = 0.9 * momentum + g + 5e-4 * kernel
        return kernel - 5e-3 * momentum, momentum

    f32 = jnp.float32
    queue = jax.eval_shape(lambda: queue_lib.init_queue(q, d, 1))
    args = (jax.ShapeDtypeStruct((c, d), f32), jax.ShapeDtypeStruct((c, d), f32), queue,
            jax.ShapeDtypeStruct((b, d), f32), jax.ShapeDtypeStruct((b,), jnp.int32))
    return jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().memory_analysis()


def fig6(queue_sizes, plain_batches):
    from configs import default
    from broadface_jax import sharding, train_step

    rows = []
    for kind, extra in [("broadface", q) for q in queue_sizes] + [("plain", n) for n in plain_batches]:
        cfg = default.get_config()
        cfg.per_device_batch_size = 128 if kind == "broadface" else 128 + extra
        cfg.queue.size_per_device = extra if kind == "broadface" else 0
        cfg.queue.chunk_size = 2048
        mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
        t0 = time.time()
        abstract_state, sh = train_step.abstract_train_state(cfg, mesh)
        step = train_step.make_train_step(cfg, mesh, sh)
        bsz = cfg.per_device_batch_size
        batch = {"image": jax.ShapeDtypeStruct((bsz, 112, 112, 3), jnp.float32),
                 "label": jax.ShapeDtypeStruct((bsz,), jnp.int32)}
        mem = step.lower(abstract_state, batch).compile().memory_analysis()
        total = mem.argument_size_in_bytes + mem.temp_size_in_bytes
        rows.append((kind, bsz, extra if kind == "broadface" else 0, bsz + (extra if kind == "broadface" else 0),
                     mem.temp_size_in_bytes / GB, total / GB, time.time() - t0))
        print(f"  compiled {kind} batch={bsz} queue={rows[-1][2]} in {rows[-1][-1]:.0f}s", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--classes", type=int, default=85742)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--fig6", action="store_true", help="also the IResNet-100 Fig. 6 analogue (slow compiles)")
    args = p.parse_args(argv)
    print("command: python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])))
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, compile only\n")

    c, d, b = args.classes, args.dim, 128
    print(f"Classifier-side step (Eq. 9 loss + dW + SGD), C={c:,} D={d} batch={b}")
    print(f"{'Q':>8} {'chunk':>8} {'temp GiB':>10} {'args GiB':>10} {'temp / unchunked':>17}")
    unchunked = {}
    for q in (32768, 65536):
        for chunk in (0, args.chunk):
            mem = classifier_side(q, c, d, b, chunk)
            if chunk == 0:
                unchunked[q] = mem.temp_size_in_bytes
            ratio = mem.temp_size_in_bytes / unchunked[q]
            print(f"{q:>8,} {chunk or q:>8,} {mem.temp_size_in_bytes / GB:>10.3f} "
                  f"{mem.argument_size_in_bytes / GB:>10.3f} {ratio:>17.3f}", flush=True)

    if args.fig6:
        print("\nFig. 6 analogue: IResNet-100, 112x112, D=512, C=85,742, one device")
        rows = fig6(queue_sizes=(0, 1024, 8192, 32768), plain_batches=(0, 128, 384, 896))
        print(f"{'step':>10} {'images':>7} {'queue':>7} {'instances':>10} {'temp GiB':>9} {'args+temp GiB':>14}")
        for kind, bsz, q, inst, temp, total, _ in rows:
            print(f"{kind:>10} {bsz:>7} {q:>7} {inst:>10} {temp:>9.2f} {total:>14.2f}")


if __name__ == "__main__":
    main()
