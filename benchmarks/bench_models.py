"""Encoder sizes, FLOPs and CPU step times; prints a Markdown table and its command.

Part 1 (full size, nothing is allocated): parameters (``params`` collection:
PyTorch's count minus the IResNet's frozen feature-BN scale) and forward
GFLOPs of one 112x112 image from XLA's cost analysis of the lowered
(uncompiled) forward (2 FLOPs per multiply-add).

Part 2 (tiny widths, run for real): median wall time of a jitted train-mode
forward + backward of the encoder alone (sum-of-embedding loss, BN statistics
updated), float32 and bfloat16 compute, after one warm-up call.

Part 3 (``memory``, slow: compiles full-size models): XLA's compiled memory
analysis of the same forward + backward at ``--memory-batch`` images of
112x112 (argument / output / temporary bytes on this backend).

    python benchmarks/bench_models.py [--parts full,tiny,memory] [--repeats 5] [--memory-batch 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

from broadface_jax import models

FULL = [("iresnet18", 512), ("iresnet34", 512), ("iresnet50", 512), ("iresnet100", 512),
        ("iresnet200", 512), ("mobilefacenet", 128), ("mbf", 512), ("resnet50", 512)]
TINY = [("iresnet18", 0.125, 32, 64), ("iresnet50", 0.125, 32, 64),
        ("mobilefacenet", 0.125, 32, 64), ("resnet50", 0.125, 32, 64),
        ("iresnet18", 0.125, 112, 16)]


def _config(name: str, dim: int, width: float, dtype: str = "float32") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(name=name, embedding_dim=dim, width=width, dropout=0.0, dtype=dtype,
             batch_norm="global"))


def _abstract(module, size: int):
    return jax.eval_shape(
        lambda k: module.init(k, jnp.zeros((1, size, size, 3)), train=False), jax.random.key(0))


def _train_step(module):
    def loss(params, batch_stats, x):
        emb, upd = module.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(emb), upd["batch_stats"]

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def full_size_table() -> list[str]:
    rows = ["| model | D | params | fwd GFLOPs @112 (XLA) |", "|---|---|---|---|"]
    for name, dim in FULL:
        module = models.build_encoder(_config(name, dim, 1.0))
        size = 224 if name == "resnet50" else 112
        variables = _abstract(module, size)
        x = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
        lowered = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, x)
        flops = (lowered.cost_analysis() or {}).get("flops", float("nan"))
        rows.append(f"| {name} | {dim} | {models.count_params(variables['params']):,} "
                    f"| {flops / 1e9:.2f} |")
    return rows


def tiny_table(repeats: int) -> list[str]:
    rows = ["| model | width | input | batch | f32 fwd+bwd ms | bf16 fwd+bwd ms |",
            "|---|---|---|---|---|---|"]
    for name, width, size, batch in TINY:
        times = {}
        for dtype in ("float32", "bfloat16"):
            module = models.build_encoder(_config(name, 64, width, dtype))
            variables = jax.jit(lambda k: module.init(k, jnp.zeros((1, size, size, 3)),
                                                      train=False))(jax.random.key(0))
            x = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
            step = _train_step(module)
            jax.block_until_ready(step(variables["params"], variables["batch_stats"], x))
            samples = []
            for _ in range(repeats):
                t = time.perf_counter()
                jax.block_until_ready(step(variables["params"], variables["batch_stats"], x))
                samples.append(time.perf_counter() - t)
            times[dtype] = 1e3 * statistics.median(samples)
        rows.append(f"| {name} | {width} | {size}x{size} | {batch} "
                    f"| {times['float32']:.1f} | {times['bfloat16']:.1f} |")
    return rows


def memory_table(batch: int) -> list[str]:
    rows = ["| model | batch | dtype | args MiB | outputs MiB | temp MiB | compile s |",
            "|---|---|---|---|---|---|---|"]
    for name, dim in (("iresnet50", 512), ("iresnet100", 512)):
        for dtype in ("float32", "bfloat16"):
            module = models.build_encoder(_config(name, dim, 1.0, dtype))
            variables = _abstract(module, 112)
            x = jax.ShapeDtypeStruct((batch, 112, 112, 3), jnp.float32)
            t = time.perf_counter()
            compiled = _train_step(module).lower(
                variables["params"], variables["batch_stats"], x).compile()
            seconds = time.perf_counter() - t
            mem = compiled.memory_analysis()
            mib = lambda b: b / 2**20  # noqa: E731
            rows.append(f"| {name} | {batch} | {dtype} | {mib(mem.argument_size_in_bytes):.0f} "
                        f"| {mib(mem.output_size_in_bytes):.0f} "
                        f"| {mib(mem.temp_size_in_bytes):.0f} | {seconds:.0f} |")
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", default="full,tiny",
                        help="comma-separated subset of full,tiny,memory")
    parser.add_argument("--memory-batch", type=int, default=128)
    args = parser.parse_args(argv)
    print(f"command: python benchmarks/bench_models.py {' '.join(argv)}".rstrip())
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s)\n")
    parts = set(args.parts.split(","))
    unknown = parts - {"full", "tiny", "memory"}
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}; choose from full,tiny,memory")
    if "full" in parts:
        print("\n".join(full_size_table()) + "\n")
    if "tiny" in parts:
        print("\n".join(tiny_table(args.repeats)) + "\n")
    if "memory" in parts:
        print("\n".join(memory_table(args.memory_batch)) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
