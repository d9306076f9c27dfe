"""BatchNorm over the global batch vs per device: the step's collectives and time.

``config.model.batch_norm = 'global'`` normalises with statistics of the whole
global batch, so under data parallelism (jit + shardings) XLA all-reduces
them in every BN layer, in the forward and again in the backward pass, each
on the critical path. ``'per_device'`` (arcface_torch's per-GPU BatchNorm)
normalises each device's rows with their own statistics: no collective in
the forward or backward, only the running-statistics mean over devices,
which nothing downstream waits for and which XLA's all-reduce combiner merges
with the gradient all-reduce.

For each mode this builds the real train step (``train_step.make_train_step``)
on a mesh of 8 fake CPU devices (``--xla_force_host_platform_device_count=8``,
set here before JAX starts) with a small IResNet, and reports from the
compiled HLO (``jitted.lower(...).compile().as_text()``) the number of
all-reduce / all-gather / reduce-scatter / collective-permute / all-to-all
ops and the bytes they all-reduce, then the compile time and the median step
time over ``--steps`` steps after warm-up (the modes interleaved step by
step, so machine noise hits both alike; the ratio is within one run).

    python benchmarks/bench_batchnorm.py [--steps 20] [--model iresnet18] [--width 0.125]
        [--size 64] [--batch 16] [--classes 1000] [--queue 0]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ is not an installed package

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_DEVICE_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1,
          "pred": 1}


def count_collectives(hlo: str) -> tuple[dict[str, int], int]:
    """({op: count}, bytes all-reduced) in compiled HLO text (async '-start' ops count once)."""
    counts = {op: 0 for op in COLLECTIVES}
    reduced = 0
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        counts[m.group(2)] += 1
        if m.group(2) == "all-reduce":
            for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
                size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
                reduced += size * _BYTES.get(dtype, 4)
    return counts, reduced


def build(mode: str, args: argparse.Namespace) -> dict:
    from broadface_jax import sharding, train_step
    from configs import default

    cfg = default.get_config()
    cfg.model.update(dict(name=args.model, width=args.width, embedding_dim=args.dim,
                          batch_norm=mode))
    cfg.num_classes = args.classes
    cfg.per_device_batch_size = args.batch
    cfg.image_size = args.size
    cfg.queue.size_per_device = args.queue
    cfg.queue.chunk_size = 0
    mesh = sharding.make_mesh(cfg.mesh)
    state, shardings = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(0))
    step = train_step.make_train_step(cfg, mesh, shardings)
    rng = np.random.default_rng(0)
    b = args.batch * mesh.size
    batch = sharding.shard_batch(
        {"image": rng.uniform(-1, 1, (b, args.size, args.size, 3)).astype(np.float32),
         "label": rng.integers(0, args.classes, b).astype(np.int32)}, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    counts, reduced = count_collectives(compiled.as_text())
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    return {"mode": mode, "step": compiled, "state": state, "batch": batch, "counts": counts,
            "reduced": reduced, "compile_s": compile_s, "times": [],
            "devices": mesh.size, "global_batch": b}


def time_one(run: dict) -> None:
    t0 = time.perf_counter()
    run["state"], metrics = run["step"](run["state"], run["batch"])
    jax.block_until_ready((run["state"], metrics))
    run["times"].append(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model", default="iresnet18")
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="per device")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--queue", type=int, default=0, help="queue rows per device")
    args = p.parse_args(argv)

    runs = [build(mode, args) for mode in ("global", "per_device")]
    for _ in range(args.steps):
        for run in runs:
            time_one(run)

    print("command: python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]))
    print(f"{args.model} width {args.width}, D={args.dim}, {args.size}x{args.size}, "
          f"batch {args.batch}/device x {runs[0]['devices']} devices = "
          f"{runs[0]['global_batch']}, C={args.classes}, queue {args.queue}/device; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    head = ["mode", *COLLECTIVES] + ["all-reduced KiB", "compile s", "step ms", "ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base = statistics.median(runs[0]["times"])
    for run in runs:
        med = statistics.median(run["times"])
        cells = ([run["mode"]] + [str(run["counts"][op]) for op in COLLECTIVES]
                 + [f"{run['reduced'] / 1024:.1f}", f"{run['compile_s']:.1f}",
                    f"{1e3 * med:.1f}", f"{med / base:.2f}"])
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
