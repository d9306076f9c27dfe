"""Issue 18, E1: BroadFace where it was made to work (a starved classifier), with a control arm.

    python -m benchmarks.regime_analyses --out OUT --workdir WORK [--data_dir TFDS]
        [--seeds 3] [--runs NAME,...] [--report_only] [--quick]

The protocol (pre-registered in docs/ANALYSES.md, Part 2, before any comparison run):

1. **Stage 1**: ArcFace from scratch with the stage-1 recipe of
   ``benchmarks/paper_analyses.py`` (``configs/lfw.py``: IResNet-18 x0.125,
   128-d, 56x56, batch 32, lr 0.1, 100 warmup steps, x0.1 at 1,500 / 2,100
   of 2,500), **stopped at step 750** while W is not yet optimal. One
   checkpoint for every arm.
2. **The lr rule** (before any comparison): ArcFace at batch 8 from that
   checkpoint for 300 steps at each candidate lr (5e-3, 1e-2, 2e-2; then
   5e-2, 1e-1 only if none qualifies); the stage-2 lr is the smallest with
   S = θ(T_visit) / m >= 0.5 (θ(137) measured twice: steps 0 -> 137 and
   163 -> 300, train mode, the whole training set).
3. **Stage 2**: batch 8 (T_visit = 1,093 / 8 ≈ 137), 2,000 steps, lr from
   the rule, x0.1 at 1,250 and 1,750; evaluation every 500 steps, checkpoints
   every 250. Arms
   (``ARMS``): A ArcFace; K ArcFace with classifier momentum 1 - 1/64 and
   lr scale 0.15625 (the queue's 64-step smoothing at the same long-run
   step); B queue 512 (64 steps) + compensation; C queue 2,048 (256
   steps) + compensation; D = C without compensation. Queues are pre-filled
   (``queue.prefill_steps`` = queue / batch). Seeds 1..n, paired.
4. **Measured per run**: learning curves (``lfw_dev``, ``lfw_people_test``)
   and final ``lfw_dev`` / ``lfw_people_test`` / ``cfp_fp``; at every
   checkpoint the classifier top-1 on the whole training set and
   mean cos(W_y, class mean); and the **regime**: from the step-500
   checkpoint the run is replayed 256 steps (deterministic: the replay is
   checked against the run's own step-750 checkpoint) and the whole
   training set is embedded in train mode at steps 500 + {0, 1, 8, 64, 137,
   250, 256}: θ at lags 1 / 8 / 64 / 137 / 256, S, the classifier staleness
   per class against the steps since its last visit (at 500 and 756), and
   the error 1 - cos(e, ·) at each lag of the stale embedding, Eq. 7, Eq. 7
   with unit W and the leave-one-out per-class oracle shift. T_visit per
   class (mean gap and median class) from the run's label stream over the
   high-lr phase.

Every run lands as ``OUT/runs/<name>.json`` with the one command that
reproduces it; ``OUT/summary.json`` / ``summary.md`` and the PNGs are rebuilt
from the JSON (``--report_only`` does only that). Resuming: a run whose JSON
exists is skipped; an unfinished run resumes from its latest checkpoint;
measurements are cached in ``WORK/<name>/regime.json``. Re-running the same
command continues where it stopped.

``--collect DIR`` first copies the run JSONs of DIR (a background run's
``OUT/runs``) into this ``OUT/runs``: with ``--report_only`` the analysis of
E1 is one command (docs/ANALYSES.md, Part 2).

``--quick``: synthetic identities, a two-layer encoder, a few steps, one
seed (the end-to-end test, ``tests/test_regime_analyses.py``).

``--protocol e2`` (``e2_protocol``): E2, the same protocol on paper-matched synthetic
identities (3,008 x 30 at 32x32, batch 16: T_visit = 188), as run (docs/ANALYSES.md,
Part 2, "E2 as run"): stage 1 stops at the first 500-step check with train top-1 >= 0.7
(at most 2,000 steps of 64), stage 2 of 1,500 steps, arms A and B per seed, then D and
then K for every seed, then (added 2026-12-07, after the others) C for every seed, the
outcome held-out pair accuracy on 3,000 fixed pairs of 500 unseen identities, the
mechanism and regime on 4 images of every class. ``--quick --protocol e2``: its
code paths at ``--quick``'s sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks import paper_analyses as pa  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    synthetic: bool
    image_size: int
    width: float
    embedding_dim: int
    margin: float  # ArcFace m (configs/lfw.py: 0.3)
    s1_batch: int
    s1_recipe_steps: int  # the recipe's length (sets warmup and lr boundaries)
    s1_stop: int  # where stage 1 stops
    s1_lr: float
    batch: int
    steps: int
    eval_every: int
    checkpoint_every: int
    lr_candidates: tuple[float, ...]
    lr_extra: tuple[float, ...]  # tried only if no candidate reaches s_min
    s_min: float
    probe_steps: int
    probe_seed: int
    t_visit: int  # lag used for S (C / B rounded)
    anchor: int  # stage-2 checkpoint the regime replay starts from
    lags: tuple[int, ...]
    check_offset: int  # replay step compared with the run's checkpoint anchor + check_offset
    window_b: int  # queue windows in steps
    window_c: int
    k_window: int  # arm K's smoothing window (steps)
    seeds: tuple[int, ...]
    curve_targets: tuple[str, ...]
    final_targets: tuple[str, ...]
    staleness_edges: tuple[int, ...]
    num_classes: int
    # E2 (synthetic, paper-matched) settings; the defaults are E1's / --quick's
    tiny_model: bool = False  # --quick's two-layer encoder instead of IResNet-18
    samples_per_identity: int = 4  # synthetic only
    heldout_identities: int = 8  # synthetic only
    eval_pairs: int = 0  # > 0: the synthetic target 'heldout' with this many pairs, fixed seed
    eval_seed: int = 7919
    s1_target_top1: float = 0.0  # > 0: stage 1 stops at the first check with train top-1 >= this
    s1_check_every: int = 0  # stage-1 checks (steps) when s1_target_top1 > 0; s1_stop = the cap
    measure_per_class: int = 0  # > 0: the mechanism / regime embed this many images per class
    arm_names: tuple[str, ...] = ("A", "K", "B", "C", "D")  # run in this order per seed
    later_arms: tuple[str, ...] = ()  # run after every seed of arm_names (if time allows)


def full_protocol(seeds: int = 3) -> Protocol:
    return Protocol(
        name="e1", synthetic=False, image_size=56, width=0.125, embedding_dim=128, margin=0.3,
        s1_batch=32, s1_recipe_steps=2500, s1_stop=750, s1_lr=0.1,
        batch=8, steps=2000, eval_every=500, checkpoint_every=250,
        lr_candidates=(5e-3, 1e-2, 2e-2), lr_extra=(5e-2, 1e-1), s_min=0.5,
        probe_steps=300, probe_seed=1, t_visit=137, anchor=500,
        lags=(1, 8, 64, 137, 256), check_offset=250,
        window_b=64, window_c=256, k_window=64, seeds=tuple(range(1, seeds + 1)),
        curve_targets=("lfw_dev", "lfw_people_test"),
        final_targets=("lfw_dev", "lfw_people_test", "cfp_fp"),
        staleness_edges=(0, 8, 32, 64, 137, 256), num_classes=1093)


def quick_protocol() -> Protocol:
    return Protocol(
        name="quick", synthetic=True, image_size=16, width=1.0, embedding_dim=16, margin=0.3,
        s1_batch=4, s1_recipe_steps=12, s1_stop=6, s1_lr=0.1,
        batch=4, steps=12, eval_every=4, checkpoint_every=4,
        lr_candidates=(5e-3, 1e-2), lr_extra=(5e-2,), s_min=0.5,
        probe_steps=6, probe_seed=1, t_visit=2, anchor=4,
        lags=(1, 2, 4), check_offset=4,
        window_b=2, window_c=4, k_window=2, seeds=(1,),
        curve_targets=("synthetic",), final_targets=("synthetic",),
        staleness_edges=(0, 2, 4), num_classes=16, tiny_model=True)


def e2_protocol(seeds: int = 3) -> Protocol:
    """E2, paper-matched synthetic identities, as run (docs/ANALYSES.md, Part 2, "E2 as run").

    The written protocol's sizes (3,008 identities x 30 images at 32x32, batch 16: T_visit
    = 188; IResNet-18 x0.125, 128-d; queues of 64 / 256 steps, pre-filled; the lr rule,
    metrics and reading of E1), shrunk to the measured CPU budget: stage 1 capped at 2,000
    steps, stage 2 of 1,500 steps (x0.1 at 938 / 1,312: the written 6,000 / 3,750 / 5,250
    scaled by 1/4, the high-lr phase inside one epoch), arms A and B per seed, then D and
    then K for every seed, as time allows, the mechanism and regime measured on 4 images of
    every class. C (queue 256 steps + compensation) was not run then; it is a later arm
    added on 2026-12-07, run after every other arm, seeds 1, 2, 3 in that order, decided
    before seeing its result (the other arms and the reading unchanged).
    """
    return Protocol(
        name="e2", synthetic=True, image_size=32, width=0.125, embedding_dim=128, margin=0.3,
        s1_batch=64, s1_recipe_steps=10000, s1_stop=2000, s1_lr=0.1,
        batch=16, steps=1500, eval_every=500, checkpoint_every=125,
        lr_candidates=(5e-3, 1e-2, 2e-2), lr_extra=(5e-2, 1e-1), s_min=0.5,
        probe_steps=400, probe_seed=1, t_visit=188, anchor=375,
        lags=(1, 8, 64, 188, 256), check_offset=250,
        window_b=64, window_c=256, k_window=64, seeds=tuple(range(1, seeds + 1)),
        curve_targets=("heldout",), final_targets=("heldout",),
        staleness_edges=(0, 16, 64, 128, 188, 376), num_classes=3008,
        samples_per_identity=30, heldout_identities=500, eval_pairs=3000, eval_seed=7919,
        s1_target_top1=0.7, s1_check_every=500, measure_per_class=4,
        arm_names=("A", "B"), later_arms=("D", "K", "C"))


def quick_e2_protocol() -> Protocol:
    """--quick --protocol e2: E2's code paths (stage 1 to a train top-1, the measured
    subset, the fixed held-out pairs, per-seed and later arms) at --quick's sizes."""
    return dataclasses.replace(
        quick_protocol(), name="quick_e2", s1_recipe_steps=24, s1_stop=12,
        samples_per_identity=6, heldout_identities=10, eval_pairs=40, eval_seed=7919,
        s1_target_top1=0.09, s1_check_every=4, measure_per_class=3, curve_targets=("heldout",),
        final_targets=("heldout",), arm_names=("A", "B"), later_arms=("D", "K"))


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    queue_steps: int  # queue = queue_steps x batch rows (0 = ArcFace)
    compensate: bool = True
    k_smoothing: bool = False  # arm K: classifier momentum / lr scale


def all_arms(p: Protocol) -> list[Arm]:
    return [Arm("A", 0), Arm("K", 0, k_smoothing=True), Arm("B", p.window_b),
            Arm("C", p.window_c), Arm("D", p.window_c, compensate=False)]


def arms(p: Protocol) -> list[Arm]:
    """The protocol's arms in run order (per seed), then its later arms."""
    by = {a.name: a for a in all_arms(p)}
    return [by[n] for n in p.arm_names + p.later_arms]


def run_order(p: Protocol) -> list[tuple[int, Arm]]:
    """(seed, arm) in the order the runs are made: every arm of ``arm_names`` seed by seed,
    then each later arm for every seed (E2: A, B per seed; then D, K and C for seeds 1..n)."""
    by = {a.name: a for a in all_arms(p)}
    return ([(seed, by[n]) for seed in p.seeds for n in p.arm_names]
            + [(seed, by[n]) for n in p.later_arms for seed in p.seeds])


ARM_TEXT = {"A": "ArcFace", "K": "ArcFace, classifier smoothed like a 64-step queue",
            "B": "queue 64 steps + compensation", "C": "queue 256 steps + compensation",
            "D": "queue 256 steps, no compensation"}


def k_optimizer(window: int, base_momentum: float) -> tuple[float, float]:
    """Arm K's classifier (momentum, lr scale): momentum 1 - 1/window averages the
    gradient over ~window steps; the lr scale keeps the long-run step lr / (1 - μ)
    of the base momentum: scale = (1 - μ_K) / (1 - μ_0)."""
    mu = 1.0 - 1.0 / window
    return mu, (1.0 - mu) / (1.0 - base_momentum)


# ------------------------------------------------------------------ configs
def _base(p: Protocol, data_dir: str) -> Any:
    if p.synthetic:
        c = pa._load_config(REPO / "configs" / "demo.py")
        c.dataset.synthetic.num_identities = p.num_classes
        c.dataset.synthetic.heldout_identities = p.heldout_identities
        c.dataset.synthetic.samples_per_identity = p.samples_per_identity
        c.num_classes = p.num_classes
        if p.eval_pairs:  # one fixed set of held-out pairs for every run (as E1's LFW)
            import ml_collections

            with c.unlocked():
                c.evals.heldout = ml_collections.ConfigDict(
                    dict(type="synthetic", num_pairs=p.eval_pairs, seed=p.eval_seed))
    else:
        c = pa._load_config(REPO / "configs" / "lfw.py")
        c.dataset.data_dir = str(data_dir)
    c.model.width = p.width
    c.model.embedding_dim = p.embedding_dim
    c.image_size = p.image_size
    return c


def stage1_config(p: Protocol, data_dir: str) -> Any:
    """configs/lfw.py's stage-1 recipe (as benchmarks/paper_analyses.py), stopped at s1_stop."""
    c = _base(p, data_dir)
    c.per_device_batch_size = p.s1_batch
    c.queue.size_per_device = 0
    c.seed = 0
    c.lr = p.s1_lr
    steps = p.s1_recipe_steps
    c.lr_boundaries = (round(0.6 * steps), round(0.84 * steps))
    c.warmup_steps = max(1, round(0.04 * steps)) if steps >= 50 else 0
    c.total_steps = p.s1_stop
    c.eval_every_steps = p.s1_check_every if p.s1_target_top1 > 0 else p.s1_stop
    c.checkpoint_every_steps = (p.s1_check_every if p.s1_target_top1 > 0
                                else max(1, p.s1_stop // 3))
    c.keep_checkpoints = 5
    c.log_every_steps = max(1, min(50, p.s1_stop))
    c.eval.targets = tuple(p.final_targets)
    return c


def stage2_config(p: Protocol, arm: Arm, seed: int, lr: float, workroot: pathlib.Path,
                  data_dir: str, total_steps: Optional[int] = None) -> Any:
    c = _base(p, data_dir)
    c.per_device_batch_size = p.batch
    c.seed = seed
    q = arm.queue_steps * p.batch
    c.queue.size_per_device = q
    c.queue.compensate = arm.compensate
    c.queue.chunk_size = min(q, 1024)
    c.queue.prefill_steps = arm.queue_steps
    if arm.k_smoothing:
        mu, scale = k_optimizer(p.k_window, float(c.optimizer.classifier.momentum))
        c.optimizer.classifier.momentum = mu
        c.optimizer.classifier.lr_scale = scale
    c.lr = lr
    c.lr_boundaries = (round(0.625 * p.steps), round(0.875 * p.steps))
    c.warmup_steps = 0
    c.init_from = str(workroot / "s1")
    c.init_classifier = True
    c.total_steps = total_steps or p.steps
    c.eval_every_steps = p.eval_every
    c.checkpoint_every_steps = p.checkpoint_every
    c.keep_checkpoints = p.steps // p.checkpoint_every + 2
    c.log_every_steps = max(1, min(p.eval_every, 50))
    c.eval.targets = tuple(p.curve_targets)
    return c


# ------------------------------------------------------------------ replay + regime
def measured_set(config: Any, per_class: int) -> tuple[Any, Any]:
    """(images f32[C * k, H, W, 3] normalised as in training, labels int[C * k]): samples
    0..k-1 of every training identity of a synthetic config, unflipped (the same pixels as
    the training stream shows them: ``synthetic.training_examples`` with ``config.seed``)."""
    import numpy as np

    from broadface_jax import input_pipeline
    from broadface_jax.datasets import synthetic

    spec = synthetic.spec_from_config(config)
    if not 0 < per_class <= spec.samples_per_identity:
        raise ValueError(f"measure_per_class={per_class} must be in [1, "
                         f"{spec.samples_per_identity}] (samples_per_identity)")
    idx = (np.arange(spec.num_identities)[:, None] * spec.samples_per_identity
           + np.arange(per_class)[None, :]).ravel()
    # one fixed shuffle: train-mode chunks mix classes as the training stream's do
    idx = idx[np.random.default_rng(0).permutation(idx.size)]
    images, labels = [], []
    for a in range(0, idx.size, 1024):
        im, lb = synthetic.training_examples(spec, idx[a:a + 1024], int(config.seed))
        images.append(input_pipeline.normalize_images(im, config))
        labels.append(lb)
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


class SubsetMeasurer(pa.Measurer):
    """paper_analyses.Measurer on ``measured_set`` (k images of every class) instead of the
    whole training set (E2: 90,240 images are ~100 s an embedding on the loaded CPU)."""

    def __init__(self, config: Any, model=None, per_class: int = 0):
        super().__init__(config, model)
        self.per_class = per_class

    def training_set(self) -> tuple[Any, Any]:
        if not self.per_class:
            return super().training_set()
        key = ("subset", int(self.config.image_size), int(self.config.seed),
               int(self.config.num_classes), self.per_class)
        if key not in pa._TRAIN_SET_CACHE:
            out = measured_set(self.config, self.per_class)
            pa._TRAIN_SET_CACHE.clear()
            pa._TRAIN_SET_CACHE[key] = out
        return pa._TRAIN_SET_CACHE[key]


def make_measurer(p: Protocol, config: Any, model=None) -> pa.Measurer:
    return SubsetMeasurer(config, model, p.measure_per_class)


class Replayer:
    """Replays training steps from a state and embeds the measured set (train mode): the
    whole training set, or ``per_class`` images of every class."""

    def __init__(self, config: Any, model=None, per_class: int = 0):
        import jax

        from broadface_jax import models, sharding, train_step

        self.config = config
        self.model = model if model is not None else models.build_encoder(config.model)
        self.mesh = sharding.make_mesh(config.mesh)
        self.measurer = SubsetMeasurer(config, self.model, per_class)
        self.images, self.labels = self.measurer.training_set()
        model_ = self.model

        @jax.jit
        def fwd(params, batch_stats, images):
            out, _ = model_.apply({"params": params, "batch_stats": batch_stats}, images,
                                  train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.PRNGKey(0)})
            return out.astype(jax.numpy.float32)

        self.fwd = fwd
        self.train_step = train_step

    def embed_train_mode(self, state) -> Any:
        """Train-mode embeddings of the whole training set in fixed chunks of 256 (the
        last chunk filled up with the first images, so every chunk has 256 real faces)."""
        import jax
        import numpy as np

        params, stats = jax.device_get(state.params["encoder"]), jax.device_get(state.batch_stats)
        n, bs = self.images.shape[0], min(256, self.images.shape[0])
        outs = []
        for a in range(0, n, bs):
            chunk = self.images[a:a + bs]
            k = chunk.shape[0]
            if k < bs:
                chunk = np.concatenate([chunk, self.images[:bs - k]])
            outs.append(np.array(self.fwd(params, stats, chunk))[:k])
        return np.concatenate(outs).astype(np.float64)

    def capture(self, state) -> dict:
        import jax
        import numpy as np

        kernel = np.array(jax.device_get(state.params["classifier"]["kernel"]), np.float64)
        return dict(w=kernel[:int(self.config.num_classes)], emb=self.embed_train_mode(state))

    def run(self, state, shardings, start: int, n: int, captures: set[int]
            ) -> tuple[dict[int, dict], Any]:
        """Steps start+1 .. start+n from ``state`` (donated); captures at offsets in
        ``captures`` (0 = the given state). Returns ({offset: capture}, final state)."""
        from broadface_jax import input_pipeline, sharding

        out = {0: self.capture(state)} if 0 in captures else {}
        step_fn = self.train_step.make_train_step(self.config, self.mesh, shardings,
                                                  model=self.model)
        it = input_pipeline.create_train_iterator(
            self.config, start_step=start + self.train_step.data_offset(self.config))
        try:
            for i in range(1, n + 1):
                state, _ = step_fn(state, sharding.shard_batch(next(it), self.mesh))
                if i in captures:
                    out[i] = self.capture(state)
        finally:
            if hasattr(it, "close"):
                it.close()
        return out, state


_LABEL_CACHE: dict[tuple, Any] = {}


def step_labels(config: Any, steps: int) -> Any:
    """int[steps, B]: the labels of training steps 1..steps (the stream after any pre-fill)."""
    import numpy as np

    from broadface_jax import input_pipeline, train_step

    off = train_step.data_offset(config)
    key = (int(config.seed), off, steps, int(config.per_device_batch_size),
           str(config.dataset.data_dir), int(config.num_classes))
    if key not in _LABEL_CACHE:
        it = input_pipeline.create_train_iterator(config, start_step=off)
        try:
            _LABEL_CACHE[key] = np.stack([np.asarray(next(it)["label"]) for _ in range(steps)])
        finally:
            if hasattr(it, "close"):
                it.close()
    return _LABEL_CACHE[key]


def regime_from_captures(p: Protocol, caps: dict[int, dict], labels: Any, anchor: int,
                         stream: Any) -> dict[str, Any]:
    """θ at each lag from the anchor, S, Eq. 7 / oracle errors, staleness vs visits."""
    from broadface_jax import analysis

    c0 = caps[0]
    out: dict[str, Any] = {"theta": {}, "errors": {}, "staleness": {}}
    for lag in p.lags:
        if lag not in caps:
            continue
        ck = caps[lag]
        out["theta"][str(lag)] = analysis.theta(ck["emb"], c0["emb"])
        out["errors"][str(lag)] = analysis.regime_errors(
            ck["emb"], c0["emb"], c0["w"][labels], ck["w"][labels], labels)
    if str(p.t_visit) in out["theta"]:
        out["S"] = out["theta"][str(p.t_visit)]["rad"] / p.margin
    for off in (0, max(p.lags)):
        if off not in caps:
            continue
        stale = analysis.class_staleness(caps[off]["emb"], caps[off]["w"], labels, p.num_classes)
        since = analysis.steps_since_visit(stream, p.num_classes, anchor + off)
        out["staleness"][str(anchor + off)] = dict(
            bins=analysis.staleness_by_visit(stale, since, p.staleness_edges),
            fit=analysis.staleness_slope(stale, since),
            mean_deg=float(math.degrees(float(stale[since >= 0].mean()))))
    return out


# ------------------------------------------------------------------ runs
def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _model(p: Protocol):
    return pa.quick_model(p.embedding_dim) if p.tiny_model else None


def _done(workdir: pathlib.Path, step: int) -> bool:
    from broadface_jax import checkpointing

    return (workdir / "checkpoints").is_dir() and step in checkpointing.all_steps(str(workdir))


def run_stage1(p: Protocol, ctx: dict) -> dict:
    """Stage 1: to s1_stop; with s1_target_top1, in segments of s1_check_every steps, stopping
    at the first checkpoint whose train top-1 (the measured set) reaches the target (s1_stop
    is then the cap). The stage-2 runs start from the last checkpoint of WORK/s1."""
    import contextlib

    from broadface_jax import train

    rec_path = ctx["out"] / "runs" / "s1.json"
    if rec_path.is_file():
        return json.loads(rec_path.read_text())
    workdir = ctx["workroot"] / "s1"
    config = stage1_config(p, ctx["data_dir"])
    t0 = time.time()
    m = make_measurer(p, config, _model(p))
    checks_path = workdir / "s1_checks.json"
    checks = json.loads(checks_path.read_text()) if checks_path.is_file() else {}
    if p.s1_target_top1 > 0:
        stops = list(range(p.s1_check_every, p.s1_stop, p.s1_check_every)) + [p.s1_stop]
        _log(f"s1: ArcFace from scratch, the {p.s1_recipe_steps}-step recipe, until train "
             f"top-1 >= {p.s1_target_top1} (checked every {p.s1_check_every} steps, at most "
             f"{p.s1_stop})")
    else:
        stops = [p.s1_stop]
        _log(f"s1: ArcFace from scratch to step {p.s1_stop} of the {p.s1_recipe_steps}-step recipe")
    stop = stops[-1]
    for stop in stops:
        config.total_steps = stop
        if not (_done(workdir, stop) and pa.split_curves(pa.read_metrics(workdir))[0].get(str(stop))):
            with contextlib.redirect_stdout(sys.stderr):
                train.train_and_evaluate(config, workdir, model=_model(p))
        if p.s1_target_top1 <= 0:
            break
        if str(stop) not in checks:
            got = m.measure(workdir, stop, ())
            checks[str(stop)] = {k: v for k, v in got.items() if k != "comp_error"}
            pa._write_json(checks_path, checks)
        _log(f"s1: step {stop}: train top-1 {checks[str(stop)]['train_top1']:.3f}")
        if checks[str(stop)]["train_top1"] >= p.s1_target_top1:
            break
    start = m.measure(workdir, stop, ())
    evals, trains = pa.split_curves(pa.read_metrics(workdir))
    rec = dict(schema=SCHEMA, protocol=p.name, name="s1", stage=1, command=ctx["command"](["s1"]),
               steps=stop, curve=evals, train=trains, start=start, checks=checks,
               final=evals.get(str(stop), {}), wall_s=time.time() - t0)
    pa._write_json(rec_path, rec)
    _log(f"s1: done at step {stop}; train top-1 {start['train_top1']:.3f}, cos(W, mean) "
         f"{start['center_cos']:.3f}")
    return rec


def run_probe(p: Protocol, lr: float, ctx: dict) -> dict:
    """ArcFace at ``lr`` for probe_steps from the stage-1 checkpoint: S over those steps."""
    import shutil

    from broadface_jax import analysis, train

    name = f"probe_lr{lr:g}"
    rec_path = ctx["out"] / "runs" / f"{name}.json"
    if rec_path.is_file():
        return json.loads(rec_path.read_text())
    t0 = time.time()
    arm = arms(p)[0]
    config = stage2_config(p, arm, p.probe_seed, lr, ctx["workroot"], ctx["data_dir"])
    tmp = ctx["workroot"] / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rep = Replayer(config, _model(p), p.measure_per_class)
    state, shardings, _ = train.initial_state(config, rep.mesh, str(tmp), rep.model)
    t = p.t_visit
    second = p.probe_steps - t
    caps, _ = rep.run(state, shardings, 0, p.probe_steps, {0, 1, 8, 64, t, second, p.probe_steps}
                      & set(range(p.probe_steps + 1)))
    th = {"0->%d" % t: analysis.theta(caps[t]["emb"], caps[0]["emb"]),
          "%d->%d" % (second, p.probe_steps): analysis.theta(caps[p.probe_steps]["emb"],
                                                             caps[second]["emb"])}
    for lag in (1, 8, 64):
        if lag in caps:
            th["0->%d" % lag] = analysis.theta(caps[lag]["emb"], caps[0]["emb"])
    theta_t = 0.5 * (th["0->%d" % t]["rad"] + th["%d->%d" % (second, p.probe_steps)]["rad"])
    rec = dict(schema=SCHEMA, protocol=p.name, name=name, stage="probe", lr=lr,
               seed=p.probe_seed, steps=p.probe_steps, theta=th, theta_t_visit_rad=theta_t,
               S=theta_t / p.margin, command=ctx["command"]([name]), wall_s=time.time() - t0)
    pa._write_json(rec_path, rec)
    shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{name}: θ({t}) = {math.degrees(theta_t):.2f}° -> S = {rec['S']:.3f}")
    return rec


def choose_lr(p: Protocol, ctx: dict) -> tuple[float, list[dict]]:
    """The pre-registered rule: the smallest candidate with S >= s_min (extras only if none)."""
    probes = []
    for lr in p.lr_candidates:
        r = run_probe(p, lr, ctx)
        probes.append(r)
        if r["S"] >= p.s_min:
            return lr, probes
    for lr in p.lr_extra:
        r = run_probe(p, lr, ctx)
        probes.append(r)
        if r["S"] >= p.s_min:
            return lr, probes
    return max(p.lr_candidates + p.lr_extra), probes


def run_stage2(p: Protocol, arm: Arm, seed: int, lr: float, ctx: dict) -> dict:
    import contextlib

    import jax
    import numpy as np

    from broadface_jax import analysis, checkpointing, train

    name = f"s2_{arm.name}_seed{seed}"
    rec_path = ctx["out"] / "runs" / f"{name}.json"
    if rec_path.is_file():
        return json.loads(rec_path.read_text())
    config = stage2_config(p, arm, seed, lr, ctx["workroot"], ctx["data_dir"])
    workdir = ctx["workroot"] / name
    model = _model(p)
    times_path = workdir / "times.json"
    t0 = time.time()
    _log(f"{name}: {ARM_TEXT[arm.name]}, lr {lr:g}, {p.steps} steps")
    with contextlib.redirect_stdout(sys.stderr):
        train.train_and_evaluate(config, workdir, model=model)
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    times["train_s"] = times.get("train_s", 0.0) + time.time() - t0
    pa._write_json(times_path, times)

    t1 = time.time()
    cache_path = workdir / "regime.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rep = Replayer(config, model, p.measure_per_class)
    steps = checkpointing.all_steps(str(workdir))
    last = steps[-1]
    mech = cache.setdefault("mechanism", {})
    for step in steps:  # at the evaluation steps (each costs an embedding of the training set)
        if (step % p.eval_every == 0 or step == last) and str(step) not in mech:
            m = rep.measurer.measure(workdir, step, ())
            mech[str(step)] = {k: v for k, v in m.items() if k != "comp_error"}
            pa._write_json(cache_path, cache)
    if "final" not in cache:
        # the targets the run evaluated at its last step are taken from its metrics (the
        # same parameters and function); only the others are evaluated here
        evals = pa.split_curves(pa.read_metrics(workdir))[0].get(str(last), {})
        have: dict[str, dict[str, float]] = {}
        for key, v in evals.items():
            t, m = key.split("/", 1)
            have.setdefault(t, {})[m] = v
        missing = tuple(t for t in p.final_targets if t not in have)
        final = {t: have[t] for t in p.final_targets if t in have}
        if missing:
            final.update(rep.measurer.evaluate(workdir, last, missing))
        cache["final"] = final
        pa._write_json(cache_path, cache)
    if "regime" not in cache:
        high = round(0.625 * p.steps)  # the high-lr phase
        stream = step_labels(config, high)
        visits = analysis.visit_intervals(stream, p.num_classes)
        state = checkpointing.restore(str(workdir), rep.measurer.target, p.anchor)
        caps, end = rep.run(state, rep.measurer.shardings, p.anchor, max(p.lags),
                            set(p.lags) | {0, p.check_offset})
        regime = regime_from_captures(p, caps, rep.labels, p.anchor, stream)
        regime["t_visit"] = visits
        # the replay is the run: its params at anchor + check_offset == the run's checkpoint
        ref = checkpointing.restore(str(workdir), rep.measurer.target, p.anchor + p.check_offset)
        w_ref = np.asarray(jax.device_get(ref.params["classifier"]["kernel"]))[:p.num_classes]
        regime["replay_check_max_abs_w"] = float(np.max(np.abs(caps[p.check_offset]["w"] - w_ref)))
        del end
        cache["regime"] = regime
        pa._write_json(cache_path, cache)
    times["analysis_s"] = times.get("analysis_s", 0.0) + time.time() - t1
    pa._write_json(times_path, times)
    evals, trains = pa.split_curves(pa.read_metrics(workdir))
    rec = dict(schema=SCHEMA, protocol=p.name, name=name, stage=2, arm=arm.name,
               arm_text=ARM_TEXT[arm.name], seed=seed, lr=lr, steps=p.steps,
               queue=arm.queue_steps * p.batch, compensate=arm.compensate,
               prefill_steps=arm.queue_steps,
               classifier_optimizer=dict(config.optimizer.classifier),
               lr_boundaries=list(config.lr_boundaries), command=ctx["command"]([name]),
               curve=evals, train=trains, mechanism=cache["mechanism"], regime=cache["regime"],
               final=cache["final"], final_step=last, wall_s=times)
    pa._write_json(rec_path, rec)
    _log(f"{name}: done in {times['train_s']:.0f} s + {times['analysis_s']:.0f} s; S "
         f"{rec['regime'].get('S', float('nan')):.3f}; final "
         + ", ".join(f"{t} {pa._headline(m)}" for t, m in rec["final"].items()))
    return rec


# ------------------------------------------------------------------ report
def load_records(out: pathlib.Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]


PRIMARY = (("lfw_people_test", "tar@far=1e-3"), ("lfw_people_test", "tar@far=1e-4"))
SECONDARY = (("lfw_dev", "accuracy"), ("cfp_fp", "accuracy"))


def primary_of(p: Protocol) -> tuple:
    """E1: TAR@FAR on lfw_people_test; synthetic: held-out pair accuracy."""
    return tuple((t, "accuracy") for t in p.final_targets) if p.synthetic else PRIMARY


def metrics_of(p: Protocol) -> list:
    if not p.synthetic:
        return list(PRIMARY + SECONDARY)
    extra = [(t, "val@far=1e-3") for t in p.final_targets] if p.eval_pairs else []
    return list(primary_of(p)) + extra


def fig_prefix(p: Protocol) -> str:
    return "e2" if p.name == "e2" else "e1"


def _by_arm(records, complete_only: bool = True, core: Optional[tuple] = None):
    """{arm: {seed: record}} of stage 2; by default only the seeds every arm has finished
    (the pre-registered rule: comparisons use whole paired seeds). With ``core`` (E2's
    per-seed arms), the complete seeds are those every core arm has; an arm outside
    ``core`` (run after every seed, if time allows) keeps its seeds among those."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        if r.get("stage") == 2:
            out.setdefault(r["arm"], {})[r["seed"]] = r
    if complete_only and out:
        names = {r["arm"] for r in records if r.get("stage") == 2}
        names = (names & set(core)) or names if core else names
        have = [set(v) for a, v in out.items() if a in names]
        seeds = set.intersection(*have) if have else set()
        out = {a: {sd: r for sd, r in v.items() if sd in seeds} for a, v in out.items()}
        out = {a: v for a, v in out.items() if v}
    return out


def _angle_from_error(err: float) -> float:
    """Degrees of arccos(1 - mean 1-cos): the angle of the mean cosine (≈ the mean angle)."""
    return math.degrees(math.acos(max(-1.0, min(1.0, 1.0 - err))))


def part1_regime(runs_dir: pathlib.Path) -> list[dict]:
    """Rows of the regime table from Part 1's run JSONs (docs/analyses/runs): θ at lags 1, 8,
    64 from the queue errors at the checkpoints of the phase named, θ(34) interpolated
    log-linearly in the lag between 8 and 64, S = θ(34) / 0.3 (m of configs/lfw.py)."""
    import numpy as np

    rows = []
    for label, pattern, steps in (
            ("Part 1 stage 2 (lr 5e-3 phase)", "s2_q*_seed*.json", (84, 168, 252)),
            ("Part 1 from scratch (lr 0.1 phase)", "s3_q*_seed*.json", (250, 500, 750, 1000, 1250, 1500))):
        errs: dict[str, list] = {}
        for f in sorted(runs_dir.glob(pattern)):
            r = json.loads(f.read_text())
            for st in steps:
                ce = r["mechanism"].get(str(st), {}).get("comp_error") or {}
                for lag in ("1", "8", "64"):
                    if lag in ce:
                        errs.setdefault(lag, []).append(ce[lag]["stale"])
        if not errs:
            continue
        theta = {lag: [_angle_from_error(min(v)), _angle_from_error(max(v))] for lag, v in errs.items()}
        t34 = [float(np.interp(np.log(34), np.log([8, 64]), [theta["8"][i], theta["64"][i]]))
               for i in (0, 1)]
        rows.append(dict(setting=label, C=1093, B=32, t_visit=1093 / 32, theta_deg=theta,
                         theta_t_visit_deg=t34, S=[math.radians(x) / 0.3 for x in t34],
                         margin=0.3, runs=len(list(runs_dir.glob(pattern)))))
    return rows


def paper_regime_row() -> dict:
    from broadface_jax import analysis

    t = 85742 / 512
    est = analysis.paper_rotation_estimate(5e-3, 5e-4, 0.9, t, 0.5)
    return dict(setting="paper (MS1MV2, batch 512, lr 5e-3, μ 0.9, λ 5e-4), estimate",
                C=85742, B=512, t_visit=t, margin=0.5, estimate=est,
                theta_t_visit_deg=[math.degrees(est["random_walk_rad"]), math.degrees(est["coherent_rad"])],
                S=[est["s_random_walk"], est["s_coherent"]])


def _paired(by_arm, a, b, fn):
    from broadface_jax import analysis

    seeds = sorted(set(by_arm.get(a, {})) & set(by_arm.get(b, {})))
    pairs = [(fn(by_arm[a][s]), fn(by_arm[b][s])) for s in seeds]
    keep = [(s, x, y) for s, (x, y) in zip(seeds, pairs) if x is not None and y is not None]
    if not keep:
        return None
    res = analysis.paired_interval([k[1] for k in keep], [k[2] for k in keep])
    res["seeds"] = [k[0] for k in keep]
    return res


def comparisons(p: Protocol) -> list[tuple[str, str, int, str]]:
    """(arm, other arm, sign, claim) of the paired differences: sign +1 / -1 a claim that
    arm - other is > 0 / < 0, 0 descriptive. E2 (a protocol with later arms) keeps D's
    descriptive comparisons with A and B, written when C was not run, also now that C is."""
    out = [("B", "A", +1, "BroadFace beats ArcFace (B > A)"),
           ("C", "B", +1, "a longer queue helps (C >= B)"),
           ("D", "C", -1, "without compensation a long queue is worse (D < C)"),
           ("B", "K", +1, "BroadFace is more than a de-noised W (B > K)"),
           ("K", "A", 0, "smoothing W alone (K vs A; no claim)")]
    if p.later_arms or "C" not in p.arm_names:
        out += [("D", "A", 0, "a 256-step queue without compensation vs ArcFace (no claim)"),
                ("D", "B", 0, "256 steps without compensation vs 64 with (no claim)")]
    return out


def summarise(p: Protocol, records: list[dict]) -> dict[str, Any]:
    import numpy as np

    by_arm = _by_arm(records, core=p.arm_names)
    summary: dict[str, Any] = {"protocol": dataclasses.asdict(p), "arms": {}, "claims": [],
                               "probes": [], "reading": {}}
    for r in records:
        if r.get("stage") == "probe":
            summary["probes"].append(dict(lr=r["lr"], S=r["S"],
                                          theta_deg=math.degrees(r["theta_t_visit_rad"])))
        if r.get("stage") == 1:
            summary["stage1"] = dict(final=r["final"], start=r["start"])
    summary["probes"].sort(key=lambda x: x["lr"])
    summary["excluded_incomplete_seeds"] = sorted(
        {r["seed"] for r in records if r.get("stage") == 2}
        - {sd for v in by_arm.values() for sd in v})
    summary["regime_table"] = [paper_regime_row()] + part1_regime(REPO / "docs" / "analyses" / "runs")
    metrics = metrics_of(p)
    primary = primary_of(p)
    summary["metric_keys"] = [f"{t}/{m}" for t, m in metrics]
    summary["primary_keys"] = [f"{t}/{m}" for t, m in primary]
    for arm, seeds in sorted(by_arm.items()):
        row: dict[str, Any] = {"seeds": sorted(seeds), "text": ARM_TEXT[arm]}
        for t, m in metrics:
            vals = [pa.final_value(r, t, m) for r in seeds.values()]
            vals = [v for v in vals if v is not None]
            if vals:
                row[f"{t}/{m}"] = dict(mean=float(np.mean(vals)), values=vals,
                                       sd=float(np.std(vals, ddof=1)) if len(vals) > 1 else None)
        reg = [r["regime"] for r in seeds.values()]
        row["S"] = float(np.mean([g["S"] for g in reg if "S" in g])) if reg else None
        row["S_values"] = [g.get("S") for g in reg]
        row["theta_deg"] = {lag: float(np.mean([g["theta"][lag]["deg"] for g in reg]))
                            for lag in sorted(reg[0]["theta"], key=int)}
        row["t_visit"] = {k: float(np.mean([g["t_visit"][k] for g in reg]))
                          for k in ("mean_gap", "median_class")}
        row["errors"] = {lag: {k: float(np.mean([g["errors"][lag][k] for g in reg]))
                               for k in reg[0]["errors"][lag]}
                         for lag in sorted(reg[0]["errors"], key=int)}
        st = {}
        for step in reg[0]["staleness"]:
            st[step] = dict(
                slope_deg_per_100_steps=float(np.mean([g["staleness"][step]["fit"]["slope_deg_per_100_steps"] for g in reg])),
                spearman=[g["staleness"][step]["fit"]["spearman"] for g in reg],
                bins=[dict(lo=b["lo"], hi=b["hi"],
                           deg=float(np.nanmean([g["staleness"][step]["bins"][i]["deg"] for g in reg])))
                      for i, b in enumerate(reg[0]["staleness"][step]["bins"])])
        row["staleness"] = st
        last = [r["mechanism"][str(r["final_step"])] for r in seeds.values()]
        row["train_top1_final"] = float(np.mean([m_["train_top1"] for m_ in last]))
        row["center_cos_final"] = float(np.mean([m_["center_cos"] for m_ in last]))
        row["replay_check_max_abs_w"] = max(g["replay_check_max_abs_w"] for g in reg)
        summary["arms"][arm] = row

    def fin(t, m):
        return lambda r: pa.final_value(r, t, m)

    for t, m in metrics:
        for a, b, sign, claim in comparisons(p):
            pi = _paired(by_arm, a, b, fin(t, m))
            summary["claims"].append(dict(claim=claim, compare=f"{a} - {b}", metric=f"{t}/{m}",
                                          primary=(t, m) in primary, result=pi,
                                          verdict=pa.verdict(pi, sign) if sign else "(descriptive)"))
    for arm in ("B", "C"):
        for lag in [str(x) for x in p.lags]:
            def gap(r, lag=lag):
                e = r["regime"]["errors"].get(lag)
                return None if e is None else e["eq7"] - e["stale"]
            seeds = sorted(by_arm.get(arm, {}))
            vals = [gap(by_arm[arm][s]) for s in seeds]
            vals = [v for v in vals if v is not None]
            pi = None
            if vals:
                from broadface_jax import analysis

                pi = analysis.paired_interval(vals, [0.0] * len(vals))
                pi["seeds"] = seeds
            summary["claims"].append(dict(claim="Eq. 7 lowers the embedding error (Eq. 7 < stale)",
                                          compare=f"{arm}: Eq. 7 - stale, lag {lag}",
                                          metric="1 - cos", primary=False, result=pi,
                                          verdict=pa.verdict(pi, -1)))
    a = summary["arms"].get("A")
    if a:
        spear = [s for st in a["staleness"].values() for s in st["spearman"]]
        slope = [st["slope_deg_per_100_steps"] for st in a["staleness"].values()]
        summary["reading"] = dict(
            S_A=a["S"], S_ok=bool(a["S"] is not None and a["S"] >= p.s_min),
            staleness_grows=bool(spear and all(s > 0 for s in spear) and all(x > 0 for x in slope)),
            note="the comparison counts only if S_ok and staleness_grows (pre-registered)")
        summary["reading"]["counts"] = summary["reading"]["S_ok"] and summary["reading"]["staleness_grows"]
    return summary


def _count_text(n: int) -> str:
    return "One primary outcome" if n == 1 else "Two primary outcomes" if n == 2 else f"{n} primary outcomes"


def _fmt(pi, scale=1.0, digits=3, kind="f"):
    if pi is None:
        return "-"
    f = f"+.{digits}{kind}"
    if not math.isfinite(pi["lo"]):
        return f"{scale * pi['diff']:{f}} (1 seed)"
    return (f"{scale * pi['diff']:{f}} [{scale * pi['lo']:{f}}, "
            f"{scale * pi['hi']:{f}}] (n={int(pi['n'])})")


def summary_markdown(s: dict) -> str:
    lines = [f"## {s['protocol']['name'].upper()} summary (generated by benchmarks/regime_analyses.py)", ""]
    if s.get("regime_table"):
        lines += ["### The regime: earlier settings (θ in degrees; ranges over runs / estimates)", "",
                  "| setting | C | B | T_visit = C/B | θ(1) | θ(8) | θ(64) | θ(T_visit) | m | S = θ(T_visit)/m |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["regime_table"]:
            th = r.get("theta_deg", {})

            def rng(v, d=2):
                return f"{v[0]:.{d}f}-{v[1]:.{d}f}" if v else "-"
            lines.append(f"| {r['setting']} | {r['C']:,} | {r['B']} | {r['t_visit']:.0f} | "
                         f"{rng(th.get('1'), 3)} | {rng(th.get('8'))} | {rng(th.get('64'))} | "
                         f"{rng(r['theta_t_visit_deg'])} | {r['margin']} | {rng(r['S'])} |")
        lines += ["", "(Paper row: √(2ηλ/(1+μ)) per step, over T_visit steps as a random walk "
                  "(low) or all in one direction (high, an upper bound). Part 1 rows: θ from the "
                  "stale queue error at the checkpoints of that lr phase; θ(34) interpolated "
                  "between lags 8 and 64.)", ""]
    if s.get("excluded_incomplete_seeds"):
        lines += [f"Seeds not yet finished by every arm (left out of all tables): "
                  f"{s['excluded_incomplete_seeds']}", ""]
    if s.get("probes"):
        lines += [f"### The lr rule (ArcFace, {s['protocol']['probe_steps']} steps from the stage-1 checkpoint)", "",
                  "| lr | θ(T_visit) | S |", "|---|---|---|"]
        lines += [f"| {x['lr']:g} | {x['theta_deg']:.2f}° | {x['S']:.3f} |" for x in s["probes"]]
        lines.append("")
    if s["arms"]:
        first = next(iter(s["arms"].values()))
        lags = list(first["theta_deg"])
        synthetic = s["protocol"].get("synthetic")
        keys = s.get("metric_keys", []) if synthetic else [
            "lfw_people_test/tar@far=1e-3", "lfw_people_test/tar@far=1e-4", "lfw_dev/accuracy",
            "cfp_fp/accuracy"]
        heads = keys if synthetic else ["TAR@1e-3", "TAR@1e-4", "lfw_dev", "cfp_fp"]
        lines += ["### Regime and finals per arm (mean over seeds)", "",
                  "| arm | seeds | T_visit mean / median class | " + " | ".join(f"θ({k})" for k in lags)
                  + " | S | train top-1 | cos(W, mean) | " + " | ".join(heads) + " |",
                  "|---|---|---|" + "---|" * len(lags) + "---|---|---|" + "---|" * len(heads)]
        for arm, r in s["arms"].items():
            def cell(key, scale=1.0, d=3):
                v = r.get(key)
                if v is None:
                    return "-"
                return f"{scale * v['mean']:.{d}f}" + (f" ± {scale * v['sd']:.{d}f}" if v["sd"] is not None else "")
            lines.append(
                f"| {arm} ({r['text']}) | {','.join(map(str, r['seeds']))} | "
                f"{r['t_visit']['mean_gap']:.0f} / {r['t_visit']['median_class']:.0f} | "
                + " | ".join(f"{r['theta_deg'][k]:.2f}°" for k in lags)
                + f" | {r['S']:.3f} | {r['train_top1_final']:.3f} | {r['center_cos_final']:.3f} | "
                + " | ".join(cell(k, 100, 2) if k.endswith("/accuracy") else cell(k) for k in keys)
                + " |")
        lines.append("")
        lines += [f"### Compensation error 1 - cos(e, ·) by lag (from the step-{s['protocol']['anchor']} checkpoint)", "",
                  "| arm | lag | stale | Eq. 7 | Eq. 7, unit W | oracle per-class shift |",
                  "|---|---|---|---|---|---|"]
        for arm, r in s["arms"].items():
            for lag, e in r["errors"].items():
                lines.append(f"| {arm} | {lag} | {e['stale']:.3e} | {e['eq7']:.3e} | "
                             f"{e['eq7_unit_w']:.3e} | {e['oracle']:.3e} |")
        lines.append("")
        lines += ["### Classifier staleness (degrees) by steps since the class's last visit", "",
                  "| arm | at step | slope (°/100 steps) | Spearman per seed | bins |", "|---|---|---|---|---|"]
        for arm, r in s["arms"].items():
            for step, st in r["staleness"].items():
                bins = ", ".join(f"[{b['lo']:.0f},{b['hi']:.0f}): {b['deg']:.1f}" for b in st["bins"])
                lines.append(f"| {arm} | {step} | {st['slope_deg_per_100_steps']:+.2f} | "
                             f"{', '.join(f'{x:.2f}' for x in st['spearman'])} | {bins} |")
        lines.append("")
    if s["arms"]:
        worst = max(r["replay_check_max_abs_w"] for r in s["arms"].values())
        lines += [f"Replay check (the regime replay against each run's own checkpoint at "
                  f"anchor + {s['protocol']['check_offset']}): max |ΔW| = {worst:g} over all runs.", ""]
    if s.get("reading"):
        rd = s["reading"]
        lines += [f"**Reading**: arm A's S = {rd['S_A']:.3f} (needs >= 0.5: {rd['S_ok']}); its "
                  f"staleness grows with time since the last visit: {rd['staleness_grows']}; the "
                  f"comparison {'counts' if rd['counts'] else 'does NOT count'} (pre-registered rule).", ""]
    lines += ["### Claims (paired by seed, mean [95% t interval]; TAR as fractions, accuracy in points)", "",
              f"{_count_text(sum(1 for k in s.get('metric_keys', []) if k in s.get('primary_keys', [])) or 2)} "
              "and several claims, no multiplicity correction; with n "
              "seeds the t interval has n - 1 degrees of freedom (n = 2: t = 12.7).", "",
              "| claim | comparison | metric | primary | paired difference | verdict |",
              "|---|---|---|---|---|---|"]
    for c in s["claims"]:
        scale, d, kind = ((100, 2, "f") if "accuracy" in c["metric"] else
                          ((1, 2, "e") if "cos" in c["metric"] else (1, 4, "f")))
        lines.append(f"| {c['claim']} | {c['compare']} | {c['metric']} | "
                     f"{'yes' if c['primary'] else ''} | {_fmt(c['result'], scale, d, kind)} | "
                     f"{c['verdict']} |")
    return "\n".join(lines) + "\n"


def draw_figures(p: Protocol, records: list[dict], s: dict, out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    by_arm = _by_arm(records, core=p.arm_names)
    written = []
    if not by_arm:
        return written

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        written.append(name)

    order = [a for a in ("A", "K", "B", "C", "D") if a in by_arm]
    # staleness vs steps since the last visit
    steps = list(s["arms"][order[0]]["staleness"])
    fig, axes = plt.subplots(1, len(steps), figsize=(5.5 * len(steps), 4), squeeze=False)
    for ax, step in zip(axes[0], steps):
        for arm in order:
            bins = s["arms"][arm]["staleness"][step]["bins"]
            xs = [0.5 * (b["lo"] + (b["hi"] if math.isfinite(b["hi"]) else 2 * b["lo"])) for b in bins]
            ax.plot(xs, [b["deg"] for b in bins], marker="o", label=f"{arm} ({ARM_TEXT[arm]})")
        ax.set_xlabel("steps since the class was last in a batch (bin centre)")
        ax.set_ylabel("angle(W_c, mean of class c's embeddings) [deg]")
        ax.set_title(f"classifier staleness at stage-2 step {step}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save(fig, f"{fig_prefix(p)}_staleness.png")

    # learning curves with seed bands
    keys = ([f"{t}/accuracy" for t in p.curve_targets] if p.synthetic
            else ["lfw_dev/accuracy", "lfw_people_test/tar@far=1e-3", "lfw_people_test/tar@far=1e-4"])
    s1 = [r for r in records if r.get("stage") == 1]
    start = s1[0].get("final", {}) if s1 else {}  # stage 1's last evaluation = stage 2's step 0
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm in order:
            series = [{**({0: start[key]} if key in start else {}),
                       **{int(k): v[key] for k, v in r["curve"].items() if key in v}}
                      for r in by_arm[arm].values()]
            series = [x for x in series if x]
            if not series:
                continue
            common = sorted(set.intersection(*[set(x) for x in series]))
            ys = np.array([[x[k] for k in common] for x in series])
            line, = ax.plot(common, ys.mean(0), marker="o", ms=3, label=f"{arm} (n={len(series)})")
            if len(series) > 1:
                sd = ys.std(0, ddof=1)
                ax.fill_between(common, ys.mean(0) - sd, ys.mean(0) + sd, alpha=0.2,
                                color=line.get_color())
        ax.set_xlabel("stage-2 step (0 = the stage-1 checkpoint)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, f"{fig_prefix(p)}_curves.png")

    # finals with 95% intervals
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        t, m = key.split("/")
        for i, arm in enumerate(order):
            vals = np.array([v for v in (pa.final_value(r, t, m) for r in by_arm[arm].values())
                             if v is not None])
            if not vals.size:
                continue
            half = (stats.t.ppf(0.975, vals.size - 1) * vals.std(ddof=1) / np.sqrt(vals.size)
                    if vals.size > 1 else 0.0)
            ax.errorbar([i], [vals.mean()], yerr=[half], fmt="o", capsize=4)
            ax.scatter([i] * vals.size, vals, s=8, color="gray")
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order)
        ax.set_ylabel(f"final {key}")
        ax.set_title("finals (mean, 95% t interval, seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    save(fig, f"{fig_prefix(p)}_finals.png")

    # compensation error vs lag incl. the oracle
    fig, axes = plt.subplots(1, len(order), figsize=(4 * len(order), 3.8), squeeze=False)
    for ax, arm in zip(axes[0], order):
        errs = s["arms"][arm]["errors"]
        lags = sorted(errs, key=int)
        for kind, ls in (("stale", "--"), ("eq7", "-"), ("eq7_unit_w", "-."), ("oracle", ":")):
            ax.plot([int(x) for x in lags], [errs[x][kind] for x in lags], ls=ls, marker="o",
                    ms=3, label=kind)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("lag (steps)")
        ax.set_title(f"{arm}: 1 - cos(e, ·)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    save(fig, f"{fig_prefix(p)}_compensation.png")
    return written


def report(p: Protocol, out: pathlib.Path, meta: dict) -> dict:
    records = [r for r in load_records(out) if r.get("protocol") == p.name]
    s = summarise(p, records)
    s["figures"] = draw_figures(p, records, s, out)
    s["meta"] = meta
    s["runs_done"] = sorted(r["name"] for r in records)
    pa._write_json(out / "summary.json", s)
    (out / "summary.md").write_text(summary_markdown(s), encoding="utf-8")
    return s


# ------------------------------------------------------------------ main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results (runs/*.json, summary, PNGs)")
    ap.add_argument("--workdir", required=True, help="parent of the run workdirs")
    ap.add_argument("--data_dir", default="runs/tfds", help="TFDS data_dir with lfw prepared")
    ap.add_argument("--protocol", default="e1", choices=("e1", "e2"),
                    help="e1: LFW (the default); e2: paper-matched synthetic identities")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--runs", default="", help="only these runs (comma-separated names), "
                    "plus what they need (stage 1, the lr rule)")
    ap.add_argument("--report_only", action="store_true")
    ap.add_argument("--collect", default="", help="first copy the run JSONs of this folder "
                    "(another --out's runs/) into OUT/runs (e.g. from a background run)")
    args = ap.parse_args(argv)
    if args.collect and not pathlib.Path(args.collect).is_dir():
        ap.error(f"--collect={args.collect}: no such folder")
    if args.seeds < 1:
        ap.error(f"--seeds={args.seeds} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import jax

    if args.protocol == "e2":
        p = quick_e2_protocol() if args.quick else e2_protocol(args.seeds)
    else:
        p = quick_protocol() if args.quick else full_protocol(args.seeds)
    out = pathlib.Path(args.out).resolve()
    workroot = pathlib.Path(args.workdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only and not p.synthetic and not pathlib.Path(args.data_dir).is_dir():
        raise SystemExit(f"--data_dir={args.data_dir} does not exist: prepare LFW first with "
                         "python -m broadface_jax.prepare --dataset lfw --manual_dir "
                         f"../shared/data/lfw --data_dir {args.data_dir}")
    base = ["python", "-m", "benchmarks.regime_analyses", "--out", str(out), "--workdir", str(workroot),
            "--data_dir", str(pathlib.Path(args.data_dir).resolve())] + (["--quick"] if args.quick else [])
    if args.protocol != "e1":
        base += ["--protocol", args.protocol]
    if not args.quick:
        base += ["--seeds", str(args.seeds)]

    def command(runs):
        return " ".join(shlex.quote(a) for a in base + ["--runs", ",".join(runs)])

    ctx = dict(out=out, workroot=workroot, data_dir=str(pathlib.Path(args.data_dir).resolve()),
               command=command)
    meta = dict(command=" ".join(shlex.quote(a) for a in base),
                machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {jax.device_count()} "
                f"{jax.devices()[0].platform} device(s)", jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    only = {x for x in args.runs.split(",") if x.strip()}
    if args.collect:
        import shutil

        (out / "runs").mkdir(parents=True, exist_ok=True)
        for f in sorted(pathlib.Path(args.collect).glob("*.json")):
            json.loads(f.read_text())  # a half-written file is an error, not a silent copy
            shutil.copyfile(f, out / "runs" / f.name)
    if not args.report_only:
        run_stage1(p, ctx)
        lr, probes = choose_lr(p, ctx)
        meta["lr"] = lr
        _log(f"lr rule: stage-2 lr {lr:g} (" + ", ".join(f"{r['lr']:g}: S {r['S']:.3f}" for r in probes) + ")")
        for seed, arm in run_order(p):
            name = f"s2_{arm.name}_seed{seed}"
            if only and name not in only:
                continue
            run_stage2(p, arm, seed, lr, ctx)
            report(p, out, meta)
    s = report(p, out, meta)
    print(summary_markdown(s), flush=True)
    return s


if __name__ == "__main__":
    main()
