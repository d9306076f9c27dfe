"""Cost of the checkpoint checksum manifest next to the save itself.

A paper-size train state on one device: the shapes the default config
(configs/default.py: IResNet-100, 512-d, 85,742 classes, SGD momentum on both
parts, a queue of 8,192 x 512 per device) builds, from ``jax.eval_shape`` (no
model is run), filled with random values. For each repeat:

* ``save (no manifest)``: an orbax manager without our finalisation callback,
  ``save`` + ``wait_until_finished`` (what a save cost before manifests);
* ``save (with manifest)``: ``checkpointing.create_manager`` + ``save`` + ``wait``
  (the manifest is written inside the save's finalisation);
* ``write_manifest``: the manifest alone, on the finished step folder;
* ``verify``: what a restore adds (read and CRC-32 every file).

Usage: python benchmarks/bench_checkpoint_checksum.py [--repeats 3] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from broadface_jax import checkpointing, sharding, train_step  # noqa: E402


def _default_config():
    import importlib.util  # noqa: PLC0415

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "default.py")
    spec = importlib.util.spec_from_file_location("default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def paper_state():
    config = _default_config()
    config.mesh.data = 1
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    abstract, shardings = train_step.abstract_train_state(config, mesh)
    rng = np.random.default_rng(0)

    def fill(leaf, sh):
        if jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(0), sh)
        if jax.numpy.issubdtype(leaf.dtype, np.floating):
            value = rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype)
        else:
            value = np.zeros(leaf.shape, leaf.dtype)
        return jax.device_put(value, sh)

    state = jax.tree.map(fill, abstract, shardings)
    nbytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract)
                 if not jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key))
    return state, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="", help="where to write (default: a temp folder)")
    args = parser.parse_args()
    state, nbytes = paper_state()
    root = args.dir or tempfile.mkdtemp(prefix="bench_checksum_")
    rows = {k: [] for k in ("save (no manifest)", "save (with manifest)", "write_manifest",
                            "verify")}
    for r in range(args.repeats):
        plain_dir = os.path.join(root, f"plain{r}")
        plain = ocp.CheckpointManager(os.path.join(plain_dir, "checkpoints"),
                                      options=ocp.CheckpointManagerOptions(create=True))
        t = time.perf_counter()
        plain.save(1, args=ocp.args.StandardSave(checkpointing._storable(state)))
        plain.wait_until_finished()
        rows["save (no manifest)"].append(time.perf_counter() - t)
        plain.close()
        shutil.rmtree(plain_dir)

        work = os.path.join(root, f"run{r}")
        manager = checkpointing.create_manager(work, max_to_keep=None)
        t = time.perf_counter()
        checkpointing.save(manager, 1, state, force=True)
        checkpointing.wait(manager)
        rows["save (with manifest)"].append(time.perf_counter() - t)
        manager.close()
        step_dir = os.path.join(checkpointing.checkpoint_dir(work), "1")
        t = time.perf_counter()
        checkpointing.write_manifest(step_dir)
        rows["write_manifest"].append(time.perf_counter() - t)
        t = time.perf_counter()
        assert checkpointing.verify(step_dir)
        rows["verify"].append(time.perf_counter() - t)
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step_dir)
                      for f in fs)
        shutil.rmtree(work)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"state: {nbytes / 2**30:.2f} GiB in memory, {on_disk / 2**30:.2f} GiB on disk "
          f"({jax.devices()[0].platform}, {args.repeats} repeats)")
    print(f"{'what':<22} {'median s':>9} {'min s':>7} {'max s':>7} {'GiB/s':>7}")
    for name, times in rows.items():
        med = float(np.median(times))
        print(f"{name:<22} {med:9.2f} {min(times):7.2f} {max(times):7.2f} "
              f"{on_disk / 2**30 / med:7.2f}")


if __name__ == "__main__":
    main()
