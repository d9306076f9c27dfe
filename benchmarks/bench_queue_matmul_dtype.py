"""Error of config.queue.matmul_dtype=bfloat16 on real embeddings, against float32 and float64.

Real faces: LFW deep-funneled (``../shared/data/lfw``, read in place), the
people of ``peopleDevTrain.txt`` with >= 2 images in file order, up to
``--people``; each image centre-cropped (``datasets.lfw.load_face``), resized
to the run's image size and embedded (flip-summed) by the encoder of a
trained run (``--workdir``; e.g. one of ``benchmarks/sampling_accuracy.py``'s
runs: IResNet-18 x 0.125 at 32x32 trained on synthetic faces). The queue holds
the first ``--queue`` of those embeddings (a multiple of ``--chunk``), labelled
by person; W's rows are the people's mean embeddings plus
``--noise`` x N(0, 1/D) per coordinate (W never saw these faces). The stored
rows W⁻ are W + 0.05 N(0, 1/D) (Eq. 7 then moves every embedding a little).

For the loss of the run's config (its s and margin), the queue loss sum and
its W gradient (dL/dW_n) are computed with ``queue.queue_loss_sum`` in
float32 and bfloat16 (chunked as ``--chunk``), and in float64 NumPy (Eq. 7,
normalisation, cosines, the margin's true derivative). Printed: relative
errors of the loss sum, relative Frobenius and max-entry errors of the
gradient. Timing of bfloat16 on this CPU means nothing (XLA:CPU has no fast
bf16 dot) and is not measured.

    python benchmarks/bench_queue_matmul_dtype.py --workdir /tmp/sampling_runs/rate1_queue512_seed0
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def lfw_faces(root: pathlib.Path, people: int, size: int):
    from PIL import Image

    from broadface_jax.datasets import lfw

    lines = (root / "peopleDevTrain.txt").read_text().splitlines()[1:]
    faces, ids, person = [], [], 0
    for line in lines:
        name, count = line.split("\t")
        if int(count) < 2:
            continue
        for i in range(1, int(count) + 1):
            img = lfw.load_face(root / "images_deepfunneled" / name / f"{name}_{i:04d}.jpg")
            faces.append(np.asarray(Image.fromarray(img).resize(
                (size, size), Image.Resampling.BILINEAR)))
            ids.append(person)
        person += 1
        if person >= people:
            break
    ids = np.array(ids)
    return np.stack(faces), ids


def np_reference(emb, w_old, kernel, labels, valid, s, m2, m3):
    """float64 (loss sum, dL/dW_n) of the queue rows (Eq. 7, margin CE, true gradient)."""
    from tests.np_reference import np_compensate, np_target

    kn = kernel / np.linalg.norm(kernel, axis=1, keepdims=True)
    e = np_compensate(emb, w_old, kernel[labels])[valid]
    y = labels[valid]
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = e @ kn.T
    rows = np.arange(len(y))
    cy = cos[rows, y]
    z = s * cos
    z[rows, y] = s * np_target(cy, 1.0, m2, m3)
    mx = z.max(1, keepdims=True)
    p = np.exp(z - mx)
    lse = np.log(p.sum(1)) + mx[:, 0]
    p /= p.sum(1, keepdims=True)
    loss = float(np.sum(lse - z[rows, y]))
    # d target / d cos_y: ArcFace cos(theta + m2) -> cos m2 + sin m2 cos / sin theta
    # (insightface's fallback past pi is linear in cos: slope 1); CosFace: 1
    if m2:
        sin = np.sqrt(np.maximum(1 - cy ** 2, 1e-12))
        dt = np.where(np.arccos(np.clip(cy, -1, 1)) + m2 > np.pi, 1.0,
                      np.cos(m2) + np.sin(m2) * cy / sin)
    else:
        dt = np.ones_like(cy)
    g = s * p
    g[rows, y] = s * (p[rows, y] - 1.0) * dt
    return loss, g.T @ e


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--lfw", type=pathlib.Path, default=REPO.parent / "shared" / "data" / "lfw")
    ap.add_argument("--people", type=int, default=600)
    ap.add_argument("--queue", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_queue_matmul_dtype.py " + shlex.join(argv or sys.argv[1:])

    import jax
    import jax.numpy as jnp

    from broadface_jax import embed, losses, queue as queue_lib, restore, workdir_config

    config = workdir_config.get_config(args.workdir)
    enc = restore.restore_encoder(args.workdir, config)
    faces, ids = lfw_faces(args.lfw, args.people, int(config.image_size))
    feats = embed.embed_faces(config, enc.params, enc.batch_stats, faces, progress=False)
    feats = np.asarray(feats, np.float64)
    q = min(args.queue, len(feats) // args.chunk * args.chunk)
    rng = np.random.default_rng(args.seed)
    d = feats.shape[1]
    c = int(ids.max()) + 1
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    kernel = np.stack([unit[ids == k].mean(0) for k in range(c)])
    kernel = kernel + args.noise * rng.normal(size=kernel.shape) / np.sqrt(d)
    emb, labels = feats[:q], ids[:q]
    w_old = kernel[labels] + 0.05 * rng.normal(size=(q, d)) / np.sqrt(d)
    valid = np.ones(q, bool)
    # the float32 inputs are the problem; the float64 reference reads the same values
    emb, w_old, kernel = (x.astype(np.float32).astype(np.float64) for x in (emb, w_old, kernel))
    queue = queue_lib.init_queue(q, d, 1).replace(
        embeddings=jnp.asarray(emb, jnp.float32), weights=jnp.asarray(w_old, jnp.float32),
        labels=jnp.asarray(labels, jnp.int32), valid=jnp.asarray(valid))
    loss = losses.build(config.loss)
    params = loss.params
    s, m2, m3 = params["s"], params.get("m2", 0.0), params.get("m3", 0.0)
    if loss.name not in ("arcface", "cosface"):
        raise SystemExit(f"the float64 reference covers arcface and cosface, not {loss.name}")
    ref_loss, ref_grad = np_reference(emb, w_old, kernel, labels, valid, s, m2, m3)
    kj = jnp.asarray(kernel, jnp.float32)
    kn = losses.l2_normalize(kj)
    out = {}
    for dtype in queue_lib.MATMUL_DTYPES:
        f = jax.jit(jax.value_and_grad(lambda kn, dt=dtype: queue_lib.queue_loss_sum(
            queue, kj, kn, loss, chunk_size=args.chunk, matmul_dtype=dt)[0]))
        val, g = f(kn)
        out[dtype] = (float(val), np.asarray(g, np.float64))

    def errs(a, b):
        (la, ga), (lb, gb) = a, b
        return (abs(la - lb) / abs(lb), np.linalg.norm(ga - gb) / np.linalg.norm(gb),
                np.abs(ga - gb).max() / np.abs(gb).max())

    ref = (ref_loss, ref_grad)
    rows = [("float32 vs float64", errs(out["float32"], ref)),
            ("bfloat16 vs float64", errs(out["bfloat16"], ref)),
            ("bfloat16 vs float32", errs(out["bfloat16"], out["float32"]))]
    print(f"`{command}`\n")
    print(f"LFW: {len(feats)} faces of {c} people embedded by {args.workdir} "
          f"({config.model.name} x {config.model.width}, {config.image_size}px, D {d}); "
          f"queue {q} rows, chunk {args.chunk}, C {c}, loss {loss.name} {params}; "
          f"loss sum (float64) {ref_loss:.4f}\n")
    print("| products | loss sum rel. error | W-gradient rel. error (Frobenius) | max entry error / max entry |")
    print("|---|---|---|---|")
    for name, (el, eg, em) in rows:
        print(f"| {name} | {el:.2e} | {eg:.2e} | {em:.2e} |")


if __name__ == "__main__":
    main()
