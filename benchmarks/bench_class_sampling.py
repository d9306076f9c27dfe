"""Class sampling, classifier side only: ours next to arcface_torch's real PartialFC_V2.

Per step, batch B = 128 embeddings of D = 512 (data, as the backbone's output),
ArcFace (s 64, m 0.5), SGD (momentum 0.9, weight decay 5e-4) on W[C, D]:

* ``pfc``: ``PartialFC_V2`` imported at run time from
  ``../shared/peers/arcface_torch/partial_fc_v2.py`` (unmodified; torch==2.13.0
  CPU, a gloo process group of size 1). Its ``sample()`` calls ``.cuda()``;
  the benchmark makes ``torch.Tensor.cuda`` return the tensor itself (CPU)
  for the run. One step: forward, ``loss.backward()`` (gradient to the
  embeddings and W), ``opt.step()``, ``opt.zero_grad()``.
* ``ours``: the real train step (``train_step.make_train_step``, one CPU
  device) with an identity "encoder" (the embeddings times one scalar
  parameter, so the gradient reaches the embeddings as PFC's does), queue 0
  or 8,192 rows (full, valid, random), chunk 2,048: the batch and the queue
  scored against the sampled rows, Eq. 9's gradient, the optimizer, the
  enqueue.
* ``floor``: the queue's two sampled products alone, ``E[Q, D] @ W_s[S, D]^T``
  (logits) and ``logits^T @ E`` (the W gradient), S = the sample's rows.

Every configuration of one C is built first; then ``--rounds`` rounds run each
configuration ``--steps`` steps in turn (interleaved, so the machine's load
hits all alike); the table gives the median over rounds of the mean step
time. ``queue cost`` = ours(queue) - ours(queue 0) at the same rate;
``cost / floor`` compares it with the two products. Peak memory: ours from
XLA's ``memory_analysis()`` of the compiled step (arguments + temporaries);
PartialFC's is not measured (no cheap peak counter for torch on the CPU).

    python benchmarks/bench_class_sampling.py [--classes 10000,100000]
        [--rates 1.0,0.3,0.1] [--queues 0,8192] [--rounds 3] [--steps 1]
    python benchmarks/bench_class_sampling.py --compile_1m   # 8 fake devices, compile only
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "peers" / "arcface_torch"
B, D = 128, 512

if "--compile_1m" in sys.argv:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(REPO))


def ours_config(num_classes: int, rate: float, queue: int, devices: int = 1,
                sharding_mode: str = "replicated"):
    from configs import default

    c = default.get_config()
    c.num_classes = num_classes
    c.model.embedding_dim = D
    c.image_size = 1  # the identity encoder's input is [B, 1, 1, D]
    c.per_device_batch_size = B
    c.queue.size_per_device = queue
    c.queue.chunk_size = min(2048, queue)
    c.classifier.sample_rate = rate
    c.classifier_sharding = sharding_mode
    if sharding_mode == "model":
        c.mesh.model = devices
    c.lr = 0.1
    return c


def identity_encoder():
    import flax.linen as nn
    import jax.numpy as jnp

    class Identity(nn.Module):
        """e = x * a: the embeddings are the data; `a` carries their gradient."""

        @nn.compact
        def __call__(self, x, train: bool):
            a = self.param("a", lambda _: jnp.ones((), jnp.float32))
            return x.reshape(x.shape[0], -1) * a

    return Identity()


class Ours:
    def __init__(self, num_classes: int, rate: float, queue: int, rng):
        import jax
        import jax.numpy as jnp

        from broadface_jax import sharding, train_step

        cfg = ours_config(num_classes, rate, queue)
        self.mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
        model = identity_encoder()
        state, sh = train_step.create_train_state(cfg, self.mesh, jax.random.PRNGKey(0), model)
        if queue:
            q = state.queue
            state = state.replace(queue=q.replace(
                embeddings=jnp.asarray(rng.normal(size=(queue, D)), jnp.float32),
                weights=jnp.asarray(0.01 * rng.normal(size=(queue, D)), jnp.float32),
                labels=jnp.asarray(rng.integers(0, num_classes, queue), jnp.int32),
                valid=jnp.ones((queue,), bool)))
            state = jax.device_put(state, sh)
        self.step = train_step.make_train_step(cfg, self.mesh, sh, model=model)
        self.batch = sharding.shard_batch(
            {"image": rng.normal(size=(B, 1, 1, D)).astype("float32"),
             "label": rng.integers(0, num_classes, B).astype("int32")}, self.mesh)
        mem = self.step.lower(state, self.batch).compile().memory_analysis()
        self.peak_gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30
        self.state = state

    def run(self, steps: int) -> float:
        import jax

        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, m = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, m))
        return (time.perf_counter() - t0) / steps


class Floor:
    """The queue's two products against S sampled rows, alone."""

    def __init__(self, rows: int, queue: int, rng):
        import jax
        import jax.numpy as jnp

        self.e = jnp.asarray(rng.normal(size=(queue, D)), jnp.float32)
        self.w = jnp.asarray(rng.normal(size=(rows, D)), jnp.float32)
        self.fn = jax.jit(lambda e, w: (e @ w.T).T @ e)
        self.fn(self.e, self.w).block_until_ready()
        self.peak_gib = float("nan")

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            out = self.fn(self.e, self.w)
        out.block_until_ready()
        return (time.perf_counter() - t0) / steps


class PFC:
    def __init__(self, num_classes: int, rate: float, rng):
        import torch

        sys.path.insert(0, str(PEERS))
        from losses import CombinedMarginLoss
        from partial_fc_v2 import PartialFC_V2

        torch.manual_seed(0)
        self.torch = torch
        self.module = PartialFC_V2(CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), D, num_classes,
                                   rate, False)
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.1, momentum=0.9,
                                   weight_decay=5e-4)
        self.emb = torch.tensor(rng.normal(size=(B, D)), dtype=torch.float32,
                                requires_grad=True)
        self.labels = torch.tensor(rng.integers(0, num_classes, B))
        self.peak_gib = float("nan")
        self.run(1)

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.module(self.emb, self.labels.clone())
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            self.emb.grad = None
        return (time.perf_counter() - t0) / steps


def init_torch():
    import socket

    import torch
    import torch.distributed as dist

    torch.Tensor.cuda = lambda self, *a, **k: self  # their sample() moves to CUDA; stay on CPU
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    return torch.__version__


def bench(args) -> None:
    import jax
    import numpy as np

    from broadface_jax import class_sampling

    torch_version = init_torch()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, jax {jax.__version__}, "
          f"torch {torch_version}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"# B {B}, D {D}, ArcFace, SGD momentum 0.9 wd 5e-4; rounds {args.rounds} x "
          f"{args.steps} step(s), median of round means")
    rng = np.random.default_rng(0)
    rows = []
    for c in args.classes:
        runners = {}
        for rate in args.rates:
            runners[("pfc", rate, 0)] = PFC(c, rate, rng)
            for q in args.queues:
                runners[("ours", rate, q)] = Ours(c, rate, q, rng)
                if q:
                    runners[("floor", rate, q)] = Floor(class_sampling.sample_size(rate, c), q,
                                                        rng)
        times = {k: [] for k in runners}
        for _ in range(args.rounds):
            for k, r in runners.items():
                times[k].append(r.run(args.steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        for (kind, rate, q), t in med.items():
            rows.append((c, kind, rate, q, t, runners[(kind, rate, q)].peak_gib,
                         med.get(("ours", rate, 0)), med.get(("floor", rate, q)),
                         med.get(("ours", 1.0, q)), med.get(("ours", 1.0, 0))))
            print(f"# C {c:,} {kind} rate {rate} queue {q}: {t:.4f} s/step "
                  f"(rounds: {', '.join(f'{x:.4f}' for x in times[(kind, rate, q)])})",
                  flush=True)
        del runners
    print("\n| C | side | rate | queue | s/step | peak GiB (XLA) | queue cost s | "
          "cost / floor | queue cost / rate-1.0 queue cost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c, kind, rate, q, t, peak, q0, floor, t1, t10 in rows:
        cost = floor_ratio = vs1 = ""
        if kind == "ours" and q and q0 is not None:
            cost = f"{t - q0:.3f}"
            floor_ratio = f"{(t - q0) / floor:.2f}" if floor else ""
            if t1 is not None and t10 is not None:
                vs1 = f"{(t - q0) / (t1 - t10):.3f}"
        print(f"| {c:,} | {kind} | {rate} | {q:,} | {t:.4f} | "
              f"{'' if peak != peak else f'{peak:.3f}'} | {cost} | {floor_ratio} | {vs1} |")
    print("\n| C | rate | ours q0 / pfc |")
    print("|---|---|---|")
    for c, kind, rate, q, t, *_ in rows:
        if kind == "ours" and q == 0:
            pfc = next(r[4] for r in rows if r[:4] == (c, "pfc", rate, 0))
            print(f"| {c:,} | {rate} | {t / pfc:.2f} |")
    print("\ncommand: python " + " ".join(shlex.quote(a) for a in sys.argv))


def compile_1m(args) -> None:
    """Per-device memory of the whole step (identity encoder) at C = 1M on 8 devices."""
    import jax

    from broadface_jax import sharding, train_step

    print(f"# compile only, {jax.device_count()} fake CPU devices, C 1,000,000, B {B}/device, "
          f"D {D}, queue 8,192/device, chunk 2,048")
    print("| classifier | rate | args GiB/device | temp GiB/device |")
    print("|---|---|---|---|")
    for mode in ("model", "all"):
        for rate in args.rates:
            cfg = ours_config(1_000_000, rate, 8192, devices=8, sharding_mode=mode)
            mesh = sharding.make_mesh(cfg.mesh)
            model = identity_encoder()
            abstract, sh = train_step.abstract_train_state(cfg, mesh, model)
            step = train_step.make_train_step(cfg, mesh, sh, model=model)
            batch = {"image": jax.ShapeDtypeStruct((B * 8, 1, 1, D), "float32"),
                     "label": jax.ShapeDtypeStruct((B * 8,), "int32")}
            mem = step.lower(abstract, batch).compile().memory_analysis()
            print(f"| {mode} | {rate} | {mem.argument_size_in_bytes / 2**30:.3f} | "
                  f"{mem.temp_size_in_bytes / 2**30:.3f} |", flush=True)
    print("\ncommand: python " + " ".join(shlex.quote(a) for a in sys.argv))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--classes", type=ints, default=[10_000, 100_000])
    p.add_argument("--rates", type=floats, default=[1.0, 0.3, 0.1])
    p.add_argument("--queues", type=ints, default=[0, 8192])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--compile_1m", action="store_true")
    args = p.parse_args()
    compile_1m(args) if args.compile_1m else bench(args)


if __name__ == "__main__":
    main()
