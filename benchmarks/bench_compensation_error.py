"""Compensation error (the paper's Fig. 5a analogue) on the demo set-up.

Trains the demo configuration (synthetic identities, tiny IResNet, BroadFace
queue) and, every `--every` steps, snapshots for a fixed probe batch the
embeddings e⁻ (train-mode forward, as enqueued) and the classifier rows W⁻_y.
`--lag` steps later it computes the current embeddings e of the same images
and reports the mean cosine error 1 − cos(e, ·) of

* the stale embedding e⁻ (no compensation), and
* the compensated embedding e* = e⁻ + ‖e⁻‖/‖W⁻_y‖ (W_y − W⁻_y) (Eq. 7).

With `--pretrain N --finetune_lr LR` the model first trains N steps with
the demo's schedule and the error is then measured while it goes on at LR
(the paper fine-tunes an ArcFace-trained model at 5e-3).

    python benchmarks/bench_compensation_error.py [--steps 300] [--lag 64] [--every 50]
        [--pretrain 300 --finetune_lr 5e-3]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lag", type=int, default=64)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--pretrain", type=int, default=0)
    p.add_argument("--finetune_lr", type=float, default=0.0)
    args = p.parse_args(argv)
    print("command: python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])))

    from configs import demo
    from broadface_jax import input_pipeline, models, queue as queue_lib, sharding
    from broadface_jax import train_step

    cfg = demo.get_config()
    cfg.total_steps = args.steps
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    model = models.build_encoder(cfg.model)
    state, sh = train_step.create_train_state(cfg, mesh, jax.random.PRNGKey(cfg.seed), model=model)
    step = train_step.make_train_step(cfg, mesh, sh, model=model)
    it = input_pipeline.create_train_iterator(cfg)
    for _ in range(args.pretrain):
        state, _ = step(state, sharding.shard_batch(next(it), mesh))
    if args.finetune_lr:
        cfg.lr, cfg.warmup_steps, cfg.lr_boundaries = args.finetune_lr, 0, ()
        step = train_step.make_train_step(cfg, mesh, sh, model=model)
    probe = next(input_pipeline.create_train_iterator(cfg, start_step=10_000))

    @jax.jit
    def embed_train_mode(params, batch_stats, images):
        out, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                             mutable=["batch_stats"])
        return out

    def snapshot(state):
        e = embed_train_mode(state.params["encoder"], state.batch_stats, probe["image"])
        w = state.params["classifier"]["kernel"][probe["label"]]
        return np.asarray(e), np.asarray(w)

    def cos_err(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return float(np.mean(1.0 - np.sum(a * b, axis=1)))

    pending = {}
    rows = []
    for s in range(args.steps):
        if s % args.every == 0:
            pending[s + args.lag] = (s, *snapshot(state))
        state, _ = step(state, sharding.shard_batch(next(it), mesh))
        if s + 1 in pending:
            s0, e_old, w_old = pending.pop(s + 1)
            e_now, w_now = snapshot(state)
            e_star = np.asarray(queue_lib.compensate(jnp.asarray(e_old), jnp.asarray(w_old),
                                                     jnp.asarray(w_now)))
            rows.append((args.pretrain + s0, args.pretrain + s + 1, cos_err(e_now, e_old), cos_err(e_now, e_star)))
    print(f"\ndemo config, {args.pretrain} steps of pre-training, then {args.steps} steps at "
          f"lr {cfg.lr:g}; lag {args.lag} steps; probe batch of {len(probe['label'])} training images")
    print(f"{'from step':>9} {'to step':>8} {'err stale e⁻':>13} {'err compensated e*':>19} {'ratio':>6}")
    for s0, s1, stale, comp in rows:
        print(f"{s0:>9} {s1:>8} {stale:>13.4f} {comp:>19.4f} {comp / stale:>6.2f}")


if __name__ == "__main__":
    main()
