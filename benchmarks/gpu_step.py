"""One-GPU BroadFace step: throughput and peak memory, plus a CPU-vs-GPU parity check.

For each backbone (IResNet-50, IResNet-100) and queue size (0 = plain
ArcFace, 8,192 = the paper's BroadFace) the real train step
(`train_step.make_train_step`) runs at 112x112, batch 128, C = 85,742,
bfloat16 compute, on one device. Each configuration runs in its own
subprocess so that `device.memory_stats()['peak_bytes_in_use']` is its own
peak; images/s is the batch over the median wall time of `--steps` steps
after `--warmup` steps (each step waited for with `block_until_ready`).

The parity check runs one float32 step of a tiny IResNet-18 from the same
initialisation on the default device and on the CPU and compares the losses
(matmul precision 'highest', so TF32 does not blur the comparison).

    python benchmarks/gpu_step.py                 # on a GPU machine
    python benchmarks/gpu_step.py --tiny          # any machine: tiny sizes, proves the code path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

FULL = dict(models=["iresnet50", "iresnet100"], width=1.0, image=112, batch=128,
            classes=85_742, queues=[0, 8192], chunk=2048, steps=20, warmup=3)
TINY = dict(models=["iresnet18"], width=0.0625, image=32, batch=8,
            classes=1000, queues=[0, 64], chunk=32, steps=3, warmup=1)


def make_config(model: str, width: float, image: int, batch: int, classes: int, queue: int,
                chunk: int, dtype: str):
    from configs import default

    c = default.get_config()
    c.model.name = model
    c.model.width = width
    c.model.dtype = dtype
    c.image_size = image
    c.per_device_batch_size = batch
    c.num_classes = classes
    c.queue.size_per_device = queue
    c.queue.chunk_size = min(chunk, queue) if queue else chunk
    c.lr_boundaries = ()
    return c


def random_batch(config, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    b, s = int(config.per_device_batch_size), int(config.image_size)
    return {"image": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
            "label": rng.integers(0, int(config.num_classes), b).astype(np.int32)}


def run_one(args, model: str, queue: int) -> dict:
    """Times one configuration on the default device (called in a subprocess)."""
    import jax
    import numpy as np

    from broadface_jax import sharding, train_step

    config = make_config(model, args.width, args.image, args.batch, args.classes, queue,
                         args.chunk, args.dtype)
    device = jax.devices()[0]
    mesh = sharding.make_mesh(config.mesh, devices=[device])
    t0 = time.perf_counter()
    state, shardings = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0))
    step = train_step.make_train_step(config, mesh, shardings)
    batch = sharding.shard_batch(random_batch(config), mesh)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    stats = device.memory_stats() or {}
    median = float(np.median(times))
    return dict(model=model, queue=queue, images_per_s=args.batch / median,
                median_ms=1e3 * median, compile_s=compile_s,
                peak_bytes=stats.get("peak_bytes_in_use"),
                loss=float(metrics["loss_classifier"]), device=str(device.device_kind))


def parity(args) -> dict:
    """One float32 step of a tiny model on the default device and on the CPU."""
    import jax
    import numpy as np

    from broadface_jax import sharding, train_step

    config = make_config("iresnet18", 0.0625, 32, 8, 11, 16, 8, "float32")
    batch = random_batch(config, seed=1)
    out = {}
    with jax.default_matmul_precision("highest"):
        for name, device in (("default", jax.devices()[0]), ("cpu", jax.devices("cpu")[0])):
            mesh = sharding.make_mesh(config.mesh, devices=[device])
            state, shardings = train_step.create_train_state(config, mesh, jax.random.PRNGKey(0))
            step = train_step.make_train_step(config, mesh, shardings)
            for _ in range(2):  # the second step also uses the queue
                state, metrics = step(state, sharding.shard_batch(batch, mesh))
            out[name] = (float(metrics["loss_encoder"]), float(metrics["loss_classifier"]),
                         str(device.platform))
    rel = max(abs(a - b) / abs(b) for a, b in zip(out["default"][:2], out["cpu"][:2]))
    return dict(default=out["default"], cpu=out["cpu"], max_rel_diff=rel,
                ok=bool(np.isfinite(rel) and rel < 1e-3))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (runs on a CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, help="timed steps (default 20, tiny 3)")
    p.add_argument("--warmup", type=int, help="untimed steps after compiling")
    p.add_argument("--one", help=argparse.SUPPRESS)  # 'model:queue', internal
    args = p.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    for k in ("width", "image", "batch", "classes", "chunk"):
        setattr(args, k, sizes[k])
    args.steps = args.steps or sizes["steps"]
    args.warmup = sizes["warmup"] if args.warmup is None else args.warmup

    if args.one:
        model, queue = args.one.split(":")
        print("RESULT " + json.dumps(run_one(args, model, int(queue))), flush=True)
        return 0

    print(f"# {' '.join(['python'] + sys.argv)}")
    rows = []
    for model in sizes["models"]:
        for queue in sizes["queues"]:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{model}:{queue}",
                   "--dtype", args.dtype, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{model} queue {queue} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(lines[-1][len("RESULT "):]))
    print(f"# device: {rows[0]['device']}; {args.dtype}; {args.image}x{args.image}, batch "
          f"{args.batch}, C={args.classes:,}, width {args.width}; median of {args.steps} "
          f"steps after {args.warmup} warmup")
    print("| model | queue/device | images/s | ms/step | peak memory (GiB) | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1024 ** 3:.2f}"
        print(f"| {r['model']} | {r['queue']:,} | {r['images_per_s']:.1f} | "
              f"{r['median_ms']:.1f} | {peak} | {r['compile_s']:.1f} |")

    par = parity(args)
    print(f"\n# parity (tiny IResNet-18, float32, 2 steps, same init): "
          f"{par['default'][2]} loss enc/cls {par['default'][0]:.6f}/{par['default'][1]:.6f} vs "
          f"cpu {par['cpu'][0]:.6f}/{par['cpu'][1]:.6f}; max rel diff {par['max_rel_diff']:.2e} "
          f"-> {'OK' if par['ok'] else 'MISMATCH'}")
    return 0 if par["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
