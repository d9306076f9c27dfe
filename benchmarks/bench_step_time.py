"""Step time with queue 0 / 2,048 / 8,192 against the cost of the extra matmuls.

Tiny backbone (IResNet-18 at width 1/8, D=128, 112x112, batch 128), C = 10,000,
one CPU device. For each queue size the full jitted BroadFace step is timed
(median over rounds, the configurations interleaved round-robin so machine
noise hits them alike) and reported as a ratio to queue 0, next to:

* the ratio predicted from FLOPs: 1 + 4·Q·D·C / FLOPs(step at Q = 0), with the
  step's FLOPs from XLA's cost analysis (the queue adds 2·Q·D·C for the logits
  and 2·Q·D·C for the classifier gradient);
* the time of those two extra matmuls alone (a jitted [Q,D]x[D,C] and
  [C,Q]x[Q,D] pair), and extra / matmuls = (t_Q − t_0) / t_matmul. Target:
  at most 1.25 (the queue costs its matmuls plus a little elementwise work:
  no copies, no recompiles, no host round trips).

    python benchmarks/bench_step_time.py [--rounds 7] [--queues 0,2048,8192]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def build(q: int, args):
    from configs import default
    from broadface_jax import sharding, train_step

    cfg = default.get_config()
    cfg.model.name = args.model
    cfg.model.width = args.width
    cfg.model.embedding_dim = args.dim
    cfg.num_classes = args.classes
    cfg.per_device_batch_size = args.batch
    cfg.image_size = args.size
    cfg.queue.size_per_device = q
    cfg.queue.chunk_size = args.chunk
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(0))
    step = train_step.make_train_step(cfg, mesh, sh)
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch(
        {"image": rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32),
         "label": rng.integers(0, args.classes, args.batch).astype(np.int32)}, mesh)
    compiled = step.lower(state, batch).compile()
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    # fill the queue first so every timed step uses all of it
    for _ in range(max(1, q // args.batch) + 1):
        state, m = step(state, batch)
    jax.block_until_ready(state)
    return {"state": state, "step": step, "batch": batch, "flops": flops,
            "fill": float(m["queue_fill"])}


def time_once(run) -> float:
    t0 = time.perf_counter()
    run["state"], m = run["step"](run["state"], run["batch"])
    jax.block_until_ready((run["state"], m))
    return time.perf_counter() - t0


def matmul_pair(q: int, d: int, c: int):
    rng = np.random.default_rng(1)
    e = jnp.asarray(rng.normal(size=(q, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(c, d)), jnp.float32)
    f = jax.jit(lambda e, w: (e @ w.T).T @ e)
    jax.block_until_ready(f(e, w))

    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(f(e, w))
        return time.perf_counter() - t0
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", default="0,2048,8192")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--model", default="iresnet18")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=10000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--chunk", type=int, default=2048)
    args = p.parse_args(argv)
    print("command: python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])))
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} cpus")
    queues = [int(x) for x in args.queues.split(",")]
    assert queues[0] == 0, "the first queue size must be 0 (the baseline)"
    runs = {q: build(q, args) for q in queues}
    mm = {q: matmul_pair(q, args.dim, args.classes) for q in queues if q}
    times = {q: [] for q in queues}
    mm_times = {q: [] for q in mm}
    for _ in range(args.rounds):
        for q in queues:
            times[q].append(time_once(runs[q]))
            if q:
                mm_times[q].append(mm[q]())
    t0 = statistics.median(times[0])
    f0 = runs[0]["flops"]
    print(f"\nmodel {args.model} width {args.width}, D={args.dim}, C={args.classes:,}, "
          f"batch {args.batch} at {args.size}x{args.size}, chunk {args.chunk}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'queue':>6} {'fill':>5} {'step s':>8} {'ratio':>6} {'FLOP-pred':>9} "
          f"{'matmuls s':>10} {'extra s':>8} {'extra/matmuls':>13}")
    for q in queues:
        t = statistics.median(times[q])
        pred = 1 + 4 * q * args.dim * args.classes / f0
        if q:
            tm = statistics.median(mm_times[q])
            print(f"{q:>6} {runs[q]['fill']:>5.2f} {t:>8.3f} {t / t0:>6.2f} {pred:>9.2f} "
                  f"{tm:>10.3f} {t - t0:>8.3f} {(t - t0) / tm:>13.2f}")
        else:
            print(f"{q:>6} {runs[q]['fill']:>5.2f} {t:>8.3f} {1.0:>6.2f} {1.0:>9.2f} "
                  f"{'-':>10} {'-':>8} {'-':>13}")
    print(f"\nbaseline step FLOPs (XLA cost analysis): {f0 / 1e9:.1f} GFLOP")


if __name__ == "__main__":
    main()
