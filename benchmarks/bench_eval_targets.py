"""Cost of the in-training evaluation targets: image loading cold vs cached, and the protocol itself.

For lfw_dev, cfp_ff and cfp_fp (real faces from ``--data-root``):
  * cold: read the protocol, decode and align every image (``broadface_jax.align``),
    write the .npz cache (a fresh temporary cache folder);
  * warm: a new evaluator reading that .npz (what every later evaluation in
    a training run, or a new run, pays);
  * protocol: the 10-fold verification on precomputed features (the embed
    function's cost is the model's and is not measured here).

    .venv/bin/python benchmarks/bench_eval_targets.py [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from broadface_jax import align, evaluation
from broadface_jax.evaluation import verification

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(data_root: str):
    from broadface_jax import cli

    c = cli.config_from_file(REPO / "configs" / "default.py")
    c.eval.data_root = data_root
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--targets", default="lfw_dev,cfp_ff,cfp_fp")
    args = parser.parse_args()
    config = _config(args.data_root)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["BROADFACE_EVAL_CACHE"] = cache
        for name in args.targets.split(","):
            clear = getattr(align, "_load_cfp_aligned_cached", None)
            if clear is not None:
                clear.cache_clear()  # no help from align's in-process cache between targets
            t0 = time.perf_counter()
            data = evaluation.build_evaluator(name, config).data()  # a new evaluator each time
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            evaluation.build_evaluator(name, config).data()
            t_warm = time.perf_counter() - t0
            feats = np.random.default_rng(0).standard_normal((data.images.shape[0], 512)).astype(np.float32)
            t0 = time.perf_counter()
            verification.evaluate_embeddings(feats[data.idx_a], feats[data.idx_b], data.issame, data.folds)
            t_proto = time.perf_counter() - t0
            rows.append((name, data.issame.size, data.images.shape[0], data.images.nbytes / 2**20,
                         t_cold, t_warm, t_proto))
    print(f"# evaluation targets (python {' '.join(sys.argv)})")
    print("| target | pairs | images | MB | cold load + align (s) | cached load (s) | 10-fold protocol (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, n, m, mb, c, w, p in rows:
        print(f"| {name} | {n:,} | {m:,} | {mb:,.0f} | {c:.1f} | {w:.2f} | {p:.3f} |")


if __name__ == "__main__":
    main()
