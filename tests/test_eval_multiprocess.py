"""Evaluation shared across processes: 2 processes x 2 CPU devices (gloo) == 1 process x 8 devices.

Each child process embeds only its share of each target's images
(``evaluation.embedding.embed_source``: contiguous shares, padded and masked
batches, features all-gathered) with the real encoder path
(``embedding.make_uint8_embed_fn`` on tests/tiny_encoder.py, params from a
fixed key; each process fills only the rows of the global batch its devices
hold), on 37 in-memory images (odd: the shares differ by one; labels
travel with them), an IJB-C folder and a YTF folder written by the test. Both
processes must get exactly what this process computes alone: the same
features row for row (1e-5: the encoder is split over 4 devices there and 8
here) and the same metrics.
"""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import sys

import numpy as np
import pytest

from tests import local_cluster

REPO = pathlib.Path(__file__).resolve().parents[1]
N_IMAGES, SIZE = 37, 16

WORKER = """
import json, sys
from absl import flags
from broadface_jax import distributed
out_path, root = sys.argv[1], sys.argv[2]
flags.FLAGS(["worker"] + sys.argv[3:])
distributed.maybe_initialize()
import jax
from tests.test_eval_multiprocess import run_case
result = run_case(root)
result["process"] = [jax.process_index(), jax.process_count(), jax.device_count()]
with open(out_path, "w") as f:
    json.dump(result, f)
"""


def run_case(root: str) -> dict:
    """Embeds the images and runs both targets in this process's JAX set-up (1 or 2 processes)."""
    import jax

    from broadface_jax import evaluation, sharding
    from broadface_jax.evaluation import embedding
    from tests.tiny_encoder import TinyEncoder

    config = runpy.run_path(str(REPO / "configs" / "default.py"))["get_config"]()
    config.image_size, config.eval.batch_size, config.model.embedding_dim = SIZE, 6, 8
    config.eval.cache_dir = os.path.join(root, "cache")
    config.evals.ytf_small = dict(type="ytf", root=os.path.join(root, "ytf"), center_crop=0.8)
    mesh = sharding.make_mesh(config.mesh)
    model = TinyEncoder()
    host = jax.device_get(model.init({"params": jax.random.PRNGKey(0)},
                                     np.zeros((1, SIZE, SIZE, 3), np.float32), train=False))
    rep = sharding.replicated(mesh)
    variables = jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), rep, lambda idx: np.asarray(x)[idx]), host)
    embed_fn = embedding.make_uint8_embed_fn(config, mesh, model)(variables["params"],
                                                                  variables["batch_stats"])
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (N_IMAGES, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, N_IMAGES)
    out = embedding.embed_source(embed_fn, embedding.ArraySource(images, labels), 6, flip=True)
    results = evaluation.run_targets([f"ijbc:{os.path.join(root, 'IJBC')}", "ytf_small"], embed_fn, config)
    owned = embedding._process_rows(mesh, 8, (SIZE, SIZE, 3), jax.process_count())
    return {"features": out.features.tolist(), "labels": out.labels.tolist(), "xnorm": out.xnorm,
            "results": results, "owned_rows": None if owned is None else owned.tolist()}


@pytest.mark.slow  # ~50 s on 2 busy cores: two child processes start JAX and compile the encoder
def test_two_processes_share_the_embedding_and_match_one(tmp_path):
    from tests import eval_folders

    rng = np.random.default_rng(11)
    eval_folders.write_ijb(tmp_path / "IJBC", rng, n_img=13)
    eval_folders.write_ytf(tmp_path / "ytf", rng, size=SIZE)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = local_cluster.child_env(2, PYTHONPATH=str(REPO))
    procs = local_cluster.start(
        [[sys.executable, str(script), str(tmp_path / f"out{pid}.json"), str(tmp_path)]
         for pid in range(2)], env)
    try:
        local_cluster.wait_ok(procs, timeout=240)
    finally:
        local_cluster.kill(procs)

    want = run_case(str(tmp_path))  # this process: 1 process, 8 devices
    for pid in range(2):
        got = json.loads((tmp_path / f"out{pid}.json").read_text())
        assert got["process"] == [pid, 2, 4]
        assert got["owned_rows"] == [4 * pid + r for r in range(4)]  # its devices' rows: no image gather
        np.testing.assert_allclose(got["features"], want["features"], rtol=1e-5, atol=1e-5)
        assert got["labels"] == want["labels"]
        assert got["xnorm"] == pytest.approx(want["xnorm"], rel=1e-5)
        assert got["results"].keys() == want["results"].keys()
        for target, metrics in want["results"].items():
            assert got["results"][target] == pytest.approx(metrics, abs=1e-5), target
    # The 1-process features are the encoder's: a float64 check of one row's flip-sum is in
    # tests/test_train.py; here the rows must not be a constant or shifted copy.
    feats = np.asarray(want["features"])
    assert np.linalg.matrix_rank(feats) == feats.shape[1]
