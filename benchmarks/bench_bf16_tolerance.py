"""How far bfloat16 losses stray from float32: the calibration of tests/test_mixed_precision.py.

    python benchmarks/bench_bf16_tolerance.py [--seeds 1000]

The test trains the same tiny IResNet (its `_config`) from the same float32
initialisation for 3 steps in float32 and in bfloat16 on one random data set
(its `_batches(seed)`) and compares the two (loss_classifier, loss_encoder)
pairs step by step with a relative tolerance. This script runs that
comparison for many data seeds (each dtype's step compiled once) and prints
the distribution of the per-seed maximum relative difference, for

- ``trajectory``: what the test compares (each dtype follows its own path);
- ``forward``: bfloat16 compute at the float32 state of the same step (the
  difference of one forward pass, without the paths' drift).

A tolerance at or inside this distribution is a flaky test: the test's
tolerance must sit far beyond the observed maximum.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1000)
    args = parser.parse_args()

    import jax

    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    import test_mixed_precision as t
    from broadface_jax import sharding, train_step

    c32, c16 = t._config("float32"), t._config("bfloat16")
    mesh = sharding.make_mesh(c32.mesh, devices=jax.devices()[:1])
    state0, _ = train_step.create_train_state(c32, mesh, jax.random.PRNGKey(3))
    step32 = jax.jit(train_step.build_train_step(c32))
    step16 = jax.jit(train_step.build_train_step(c16))

    def losses(m):
        return float(m["loss_classifier"]), float(m["loss_encoder"])

    start = time.time()
    trajectory, forward = [], []
    for seed in range(args.seeds):
        s32 = s16 = state0
        l32, l16, lfwd = [], [], []
        for batch in t._batches(seed):
            batch = sharding.shard_batch(batch, mesh)
            lfwd.append(losses(step16(s32, batch)[1]))
            s32, m32 = step32(s32, batch)
            s16, m16 = step16(s16, batch)
            l32.append(losses(m32))
            l16.append(losses(m16))
        l32, l16, lfwd = map(np.asarray, (l32, l16, lfwd))
        trajectory.append(np.max(np.abs(l16 - l32) / np.abs(l32)))
        forward.append(np.max(np.abs(lfwd - l32) / np.abs(l32)))

    qs = (0.5, 0.9, 0.99, 0.999)
    print(f"{args.seeds} data seeds, {t.STEPS} steps, {time.time() - start:.0f} s, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| comparison | " + " | ".join(f"q{q:g}" for q in qs) + " | max | seeds > 1e-2 |")
    print("|---|" + "---|" * (len(qs) + 2))
    for name, values in (("trajectory", trajectory), ("forward", forward)):
        v = np.asarray(values)
        print(f"| {name} | " + " | ".join(f"{np.quantile(v, q):.4f}" for q in qs)
              + f" | {v.max():.4f} | {int(np.sum(v > 1e-2))} |")
    print(f"command: python benchmarks/bench_bf16_tolerance.py --seeds {args.seeds}")


if __name__ == "__main__":
    main()
