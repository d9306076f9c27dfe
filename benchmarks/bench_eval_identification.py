"""MegaFace-sized 1:N identification: 3,530 probes x 1,000,000 distractors at D = 512.

Probes: 3,530 images of 80 identities (the MegaFace FaceScrub probe set's
size), features = identity centre + noise. Distractors: standard normal
float32, generated chunk by chunk from a seed by a generator, so they never
sit in memory together (only one chunk of ``--chunk`` rows does). The run
computes rank-1 and TAR @ FAR = 1e-6 with the running top-k of
:mod:`broadface_jax.evaluation.identification`; the full probe x distractor
score matrix (14 GB in float32) never exists.

    .venv/bin/python benchmarks/bench_eval_identification.py [--distractors 1000000]

Fewer ``--distractors`` measure a fraction; the time scales linearly in the
distractor count (every chunk costs the same), memory does not grow with it.
Distractor generation time is measured separately (a second pass of the same
generator without scoring) and subtracted.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

from broadface_jax.evaluation import identification

N_PROBES, N_IDS, DIM = 3_530, 80, 512


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def distractor_stream(seed: int, total: int, chunk: int):
    """Standard normal f32[chunk, DIM] blocks, deterministic in (seed, block index)."""
    for i, start in enumerate(range(0, total, chunk)):
        rng = np.random.default_rng([seed, i])
        yield rng.standard_normal((min(chunk, total - start), DIM), dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distractors", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    labels = np.sort(rng.integers(0, N_IDS, N_PROBES))
    centres = rng.standard_normal((N_IDS, DIM))
    probes = (centres[labels] + 1.5 * rng.standard_normal((N_PROBES, DIM))).astype(np.float32)
    rss0 = rss_mb()

    t0 = time.perf_counter()
    for _ in distractor_stream(args.seed + 1, args.distractors, args.chunk):
        pass
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = identification.megaface_identification(
        probes, labels, distractor_stream(args.seed + 1, args.distractors, args.chunk),
        num_distractors=args.distractors, ranks=(1,), fars=(1e-6,), chunk_size=args.chunk)
    t_all = time.perf_counter() - t0
    peak = rss_mb()

    t_eval = t_all - t_gen
    scale = 1_000_000 / args.distractors
    print(f"# MegaFace-sized 1:N (python {' '.join(sys.argv)})")
    print(f"probes {N_PROBES:,} ({N_IDS} ids, {res.num_genuine:,} genuine pairs)  distractors "
          f"{args.distractors:,}  D {DIM}  chunk {args.chunk:,}  impostor scores {N_PROBES * args.distractors:,}")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| generate distractors (separate pass, subtracted) | {t_gen:.1f} s |")
    print(f"| identification + TAR@FAR (scoring, running top-k) | {t_eval:.1f} s |")
    if scale != 1:
        print(f"| extrapolated to 1,000,000 distractors (x{scale:g}, linear) | {t_eval * scale:.0f} s |")
    print(f"| peak RSS | {peak:,.0f} MB (before the run: {rss0:,.0f} MB) |")
    print(f"| full score matrix it avoids | {N_PROBES * args.distractors * 4 / 2**30:,.1f} GiB |")
    print("metrics (synthetic features):", {k: round(v, 4) for k, v in res.metrics().items()})


if __name__ == "__main__":
    main()
