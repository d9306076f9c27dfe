"""IJB-C-sized 1:1 template verification: pooling, pair scoring and TAR@FAR time and memory.

Shape of IJB-C 1:1 (insightface meta files): 469,375 face images in 23,124
templates, 15,658,489 template pairs (19,557 genuine), D = 512. Metadata and
image features here are random with that shape (features standard normal
float32, so the TARs are meaningless; this measures cost only): templates
get images uniformly at random, each image a media id out of 4 per template,
face scores uniform in [0.5, 1].

    .venv/bin/python benchmarks/bench_eval_ijb.py [--fraction 1.0]

``--fraction f`` scales images, templates and pairs by f (to extrapolate
linearly when the full size is too slow for the machine at hand).
Peak memory is the process's maximum resident set size (getrusage).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

from broadface_jax.evaluation import ijb, tar_far

N_IMAGES, N_TEMPLATES, N_PAIRS, N_GENUINE, DIM = 469_375, 23_124, 15_658_489, 19_557, 512


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8192, help="template pairs scored at once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    f = args.fraction
    n_img, n_tmpl = int(N_IMAGES * f), int(N_TEMPLATES * f)
    n_pairs, n_gen = int(N_PAIRS * f), max(1, int(N_GENUINE * f))
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    template_ids = np.sort(rng.choice(200_000, n_tmpl, replace=False)) + 1
    templates = template_ids[np.r_[np.arange(n_tmpl), rng.integers(0, n_tmpl, n_img - n_tmpl)]]
    medias = templates * 4 + rng.integers(0, 4, n_img)
    face_scores = rng.uniform(0.5, 1.0, n_img).astype(np.float32)
    feats = rng.standard_normal((n_img, DIM), dtype=np.float32)
    t1 = template_ids[rng.integers(0, n_tmpl, n_pairs)]
    t2 = template_ids[rng.integers(0, n_tmpl, n_pairs)]
    labels = np.zeros(n_pairs, np.int8)
    labels[rng.choice(n_pairs, n_gen, replace=False)] = 1
    t_gen = time.perf_counter() - t0
    rss_inputs = rss_mb()

    t0 = time.perf_counter()
    tfeats, uniq = ijb.image_to_template_features(feats, templates, medias, face_scores)
    t_pool = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = ijb.template_pair_scores(tfeats, uniq, t1, t2, batch_size=args.batch_size)
    t_score = time.perf_counter() - t0
    t0 = time.perf_counter()
    tars = tar_far.tar_at_far(scores, labels)
    t_tar = time.perf_counter() - t0
    peak = rss_mb()

    cmd = "python " + " ".join(sys.argv)
    print(f"# IJB-C-sized 1:1 evaluation ({cmd})")
    print(f"images {n_img:,}  templates {uniq.size:,}  pairs {n_pairs:,}  genuine {n_gen:,}  D {DIM}  "
          f"batch {args.batch_size:,}")
    print("| step | seconds |")
    print("|---|---|")
    print(f"| generate random inputs (not part of the protocol) | {t_gen:.1f} |")
    print(f"| media + template pooling (sparse W @ F) | {t_pool:.2f} |")
    print(f"| template-pair cosine scores, batched | {t_score:.2f} |")
    print(f"| TAR@FAR 1e-6..1e-1 (partition) | {t_tar:.2f} |")
    print(f"| total protocol | {t_pool + t_score + t_tar:.2f} |")
    print(f"peak RSS {peak:,.0f} MB (inputs alone: {rss_inputs:,.0f} MB; image features "
          f"{feats.nbytes / 2**20:,.0f} MB, pair lists {(t1.nbytes + t2.nbytes + labels.nbytes) / 2**20:,.0f} MB)")
    print("TAR (random features, chance level):", {tar_far.format_far(k): round(v, 4) for k, v in tars.items()})


if __name__ == "__main__":
    main()
