"""Trainer costs: checkpoint save / restore of a full state, and the loop's overhead.

1. Checkpoints. The TrainState of a config (default: the paper's recipe,
   IResNet-100, 85,742 classes, queue 8,192) is built abstractly
   (`jax.eval_shape` of `train_step.create_train_state`: nothing is compiled)
   and filled with random values; it is saved with `checkpointing.save`
   (orbax, async) and restored into an abstract sharded target
   (`checkpointing.restore`). Reported: state size, the blocking part of the
   save (what the training loop waits for), the total save time
   (`wait_until_finished`), the checkpoint's size on disk, and the restore
   time. Medians of `--repeats`.

2. Loop overhead. `train.train_and_evaluate` on `configs/demo.py` for
   `--steps` steps (no evaluation, one checkpoint at the end, a log line,
   metrics.jsonl record and TensorBoard write every `--log_every` steps)
   against a bare loop of the same jitted step over the same input pipeline
   that syncs once per `--log_every` steps. Both report the median seconds
   per step over blocks of `--log_every` steps, leaving out the first block
   (compilation); the two alternate for `--rounds` rounds, because other
   processes on a shared machine shift single measurements a lot.

    python benchmarks/bench_trainer.py [--config configs/default.py] [--repeats 3]
        [--steps 100] [--log_every 10] [--rounds 2] [--tmp /tmp/bench_trainer] [--skip_loop]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(path: str, arg: str | None = None):
    from broadface_jax import cli

    return cli.config_from_file(REPO / path, arg or None)


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_checkpoint(config_path: str, repeats: int, tmp: pathlib.Path) -> list[str]:
    import jax
    import numpy as np

    from broadface_jax import checkpointing, sharding, train_step

    config = load_config(config_path)
    mesh = sharding.make_mesh(config.mesh)
    abstract = jax.eval_shape(
        lambda k: train_step.create_train_state(config, mesh, k)[0], jax.random.PRNGKey(0))
    shardings = train_step.state_shardings(abstract, config, mesh)
    rng = np.random.default_rng(0)

    def fill(x, s):
        value = (rng.standard_normal(x.shape, np.float32) if np.issubdtype(x.dtype, np.floating)
                 else np.zeros(x.shape, x.dtype))
        return jax.device_put(value, s)

    state = jax.tree.map(fill, abstract, shardings)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    target = checkpointing.abstract_like(abstract, shardings)

    blocking, total, restore, disk = [], [], [], 0
    for r in range(repeats):
        workdir = tmp / f"ckpt_{r}"
        shutil.rmtree(workdir, ignore_errors=True)
        manager = checkpointing.create_manager(workdir, max_to_keep=1)
        t0 = time.perf_counter()
        checkpointing.save(manager, 1, state, force=True)
        t1 = time.perf_counter()
        manager.wait_until_finished()
        t2 = time.perf_counter()
        manager.close()
        blocking.append(t1 - t0)
        total.append(t2 - t0)
        disk = _dir_bytes(pathlib.Path(checkpointing.checkpoint_dir(workdir)))
        t0 = time.perf_counter()
        restored = checkpointing.restore(workdir, target)
        jax.block_until_ready(restored)
        restore.append(time.perf_counter() - t0)
        del restored
        shutil.rmtree(workdir, ignore_errors=True)
    med = statistics.median
    return [
        f"| state of {config_path} ({config.model.name}, C={config.num_classes}, "
        f"queue {config.queue.size_per_device}/device, {jax.device_count()} device(s)) "
        f"| {state_bytes / 2**20:.0f} MiB | {disk / 2**20:.0f} MiB | {med(blocking):.2f} s "
        f"| {med(total):.2f} s | {med(restore):.2f} s |"]


def _trainer_times(config, tmp: pathlib.Path) -> list[float]:
    """Seconds per step of each logged block of train_and_evaluate, first block dropped."""
    import json

    from broadface_jax import train

    workdir = tmp / "loop"
    shutil.rmtree(workdir, ignore_errors=True)
    train.train_and_evaluate(config, workdir)
    records = [json.loads(line) for line in (workdir / train.METRICS_FILE).read_text().splitlines()]
    shutil.rmtree(workdir, ignore_errors=True)
    return [r["sec_per_step"] for r in records if "sec_per_step" in r][1:]


def _bare_times(config, every: int) -> list[float]:
    """The same step over the same pipeline, synced once per block; first block dropped."""
    import jax

    from broadface_jax import input_pipeline, sharding, train_step

    mesh = sharding.make_mesh(config.mesh)
    state, shardings = train_step.create_train_state(config, mesh, jax.random.PRNGKey(config.seed))
    step_fn = train_step.make_train_step(config, mesh, shardings)
    iterator = input_pipeline.create_train_iterator(config, 0)
    times = []
    t = time.perf_counter()
    for step in range(1, config.total_steps + 1):
        state, metrics = step_fn(state, sharding.shard_batch(next(iterator), mesh))
        if step % every == 0:
            jax.device_get(metrics)
            now = time.perf_counter()
            times.append((now - t) / every)
            t = now
    iterator.close()
    return times[1:]


def bench_loop(steps: int, every: int, rounds: int, tmp: pathlib.Path) -> list[str]:
    import numpy as np

    from broadface_jax import sharding, train

    config = load_config("configs/demo.py")
    config.total_steps = steps
    config.log_every_steps = every
    config.checkpoint_every_steps = 0
    config.eval.targets = ()
    rows = []
    for r in range(rounds):  # alternate, so that load from other processes hits both
        bare = float(np.median(_bare_times(config, every)))
        trainer = float(np.median(_trainer_times(config, tmp)))
        rows.append(f"| demo config, batch {sharding.global_batch_size(config)}, steps "
                    f"{every + 1}..{steps}, log every {every}, round {r + 1} "
                    f"| {bare * 1e3:.1f} ms | {trainer * 1e3:.1f} ms "
                    f"| {(trainer / bare - 1) * 100:+.1f}% |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tmp", default="/tmp/bench_trainer")
    parser.add_argument("--skip_loop", action="store_true")
    args = parser.parse_args()
    tmp = pathlib.Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    print("command: python benchmarks/bench_trainer.py " + " ".join(sys.argv[1:]))
    print("\n| checkpointed state | in memory | on disk | save, blocking | save, total "
          "| restore |\n|---|---|---|---|---|---|")
    for row in bench_checkpoint(args.config, args.repeats, tmp):
        print(row, flush=True)
    if not args.skip_loop:
        print("\n| loop | bare step loop, median s/step | train_and_evaluate, median s/step "
              "| overhead |\n|---|---|---|---|")
        for row in bench_loop(args.steps, args.log_every, args.rounds, tmp):
            print(row, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
