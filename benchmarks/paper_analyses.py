"""The paper's recipe in miniature on real faces: ArcFace pretraining, then BroadFace vs ArcFace.

    python -m benchmarks.paper_analyses --out docs/analyses [--quick] [--workdir runs/paper_analyses]
        [--stages 1,2,3] [--seeds 3] [--report_only]

Protocol (the paper's sections 4.1 and 4.4, scaled to LFW ``dev_train``:
1,093 identities, 5,358 faces, ~4.9 per identity):

1. **Stage 1**: ArcFace from scratch (``configs/lfw.py``'s recipe: IResNet-18
   at ``image_size``, lr 0.1 with warmup and steps at 60% / 84%), evaluated
   on the way. Its last checkpoint (encoder + classifier) is the start of
   every stage-2 arm.
2. **Stage 2**: fine-tuning from that checkpoint (``config.init_from``,
   ``init_classifier=True``) at lr 0.1 / 20 = 5e-3 (the paper's 5e-3 after
   ArcFace at 0.1), x0.1 at 62.5% and 87.5% of the steps (the paper's 50k
   and 70k of 80k), the same number of steps for every arm. Arms: ArcFace
   (queue 0) and BroadFace with ``queue.size_per_device`` in ``queues``, each
   with compensation (Eq. 7) on and off. Every arm runs with the same seeds
   (data order, flips, dropout), so differences are paired by seed.
3. **From scratch**: ArcFace and the best stage-2 BroadFace arm (highest
   mean final ``lfw_dev`` over complete seeds; the largest queue with
   compensation until stage 2 is complete) trained with the stage-1 recipe
   from random init, same seeds: the Fig. 7b question (learning speed).

Every run is one ``broadface_jax.train.train_and_evaluate`` in its own
workdir under ``--workdir`` with ``eval_every_steps`` giving the learning
curve (``curve_targets``) and a checkpoint at every evaluation step. After
training, each kept checkpoint is reloaded and measured (stages 2 and 3):

* the classifier's top-1 accuracy on the current (eval-mode) embeddings of
  the whole training set, and the mean cos(W_y, mean embedding of class y)
  (:mod:`broadface_jax.analysis`);
* the classes with a positive-class gradient at the next step: distinct
  labels of the next batch, of the queue, and of both;
* for queue arms, the Fig. 5a error: the queued embeddings of the batch
  written ``lag`` steps ago against the current train-mode embeddings of the
  same images (the same batch, re-read from the deterministic input
  pipeline; its labels are checked against the queue's), stale and
  compensated (Eq. 7), at every lag in ``lags`` the queue holds;
* ``final_targets`` on the last checkpoint.

Outputs under ``--out``: ``runs/<name>.json`` per finished run (curves,
training metrics, mechanism, compensation errors, final evaluation, wall
time), ``summary.json`` and ``summary.md`` (per-arm means, paired
differences against ArcFace over seeds with 95% t intervals, one table per
claim of the paper marked seen / not seen / opposite) and PNG figures.

Resuming: a run whose JSON exists is skipped; an unfinished run resumes
from its latest checkpoint (``train_and_evaluate``), and measured
checkpoints are kept in ``<workdir>/<name>/analysis.json`` so they are not
measured twice. Re-running the same command continues where it stopped.

``--quick``: synthetic identities, a two-layer encoder, a few steps per
stage, one seed, arms ArcFace and one BroadFace queue (the end-to-end test).
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
import shutil
import sys
import time
from typing import Any, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEMA = 1


# ------------------------------------------------------------------ protocol
@dataclasses.dataclass(frozen=True)
class Protocol:
    """Every size of the protocol in one place (``full`` or ``quick``)."""

    name: str
    image_size: int
    width: float
    embedding_dim: int
    batch: int  # per device
    stage1_steps: int
    stage1_eval_every: int
    lr: float  # stage 1 and from scratch; stage 2 uses lr / finetune_div
    finetune_div: float
    stage2_steps: int
    stage2_eval_every: int
    queues: tuple[int, ...]  # per device, BroadFace arms (0 = ArcFace is always run)
    seeds: tuple[int, ...]  # stage-2 / scratch seeds (stage 1 uses seed 0)
    scratch_steps: int
    scratch_eval_every: int
    curve_targets: tuple[str, ...]
    final_targets: tuple[str, ...]
    stage1_final_targets: tuple[str, ...]
    lags: tuple[int, ...]  # Fig. 5a lags at the last checkpoint of a run
    lags_every: tuple[int, ...]  # at the other evaluation checkpoints (fewer: each costs a batch)
    compensations: tuple[bool, ...]  # queue arms of stage 2
    synthetic: bool
    data_dir: str = "runs/tfds"


def full_protocol(seeds: int = 3) -> Protocol:
    """LFW dev_train, IResNet-18 x0.125 at 56x56 (the best stage-1 recipe measured; docs/ANALYSES.md)."""
    return Protocol(
        name="full", image_size=56, width=0.125, embedding_dim=128, batch=32,
        stage1_steps=2500, stage1_eval_every=500, lr=0.1, finetune_div=20.0,
        # 3 epochs of 5,358 faces at 32 per step (the paper's 80k x 512 is ~7.1
        # epochs of MS1MV2's 5.8M images); 6 evaluation points
        stage2_steps=504, stage2_eval_every=84,
        queues=(1024, 4096, 8192),  # 0.19 / 0.76 / 1.53 epochs
        seeds=tuple(range(1, seeds + 1)),
        scratch_steps=2500, scratch_eval_every=250,
        curve_targets=("lfw_dev", "lfw_people_test"),
        final_targets=("lfw_dev", "lfw_people_test", "cfp_fp"),
        stage1_final_targets=("lfw_dev", "lfw_people_test", "cfp_ff", "cfp_fp"),
        lags=(1, 2, 4, 8, 16, 32, 64, 128, 256), lags_every=(1, 8, 64, 256),
        compensations=(True, False), synthetic=False)


def quick_protocol() -> Protocol:
    """A few steps per stage on synthetic identities: the end-to-end test."""
    return Protocol(
        name="quick", image_size=16, width=1.0, embedding_dim=16, batch=4,
        stage1_steps=4, stage1_eval_every=2, lr=0.1, finetune_div=20.0,
        stage2_steps=4, stage2_eval_every=2, queues=(8,), seeds=(1,),
        scratch_steps=4, scratch_eval_every=2,
        curve_targets=("synthetic",), final_targets=("synthetic",),
        stage1_final_targets=("synthetic",), lags=(1, 2, 4), lags_every=(1,),
        compensations=(True,), synthetic=True)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of the protocol."""

    name: str
    stage: int  # 1, 2 (fine-tune) or 3 (from scratch)
    queue: int  # per device; 0 = ArcFace
    compensate: bool
    seed: int

    @property
    def arm(self) -> str:
        return arm_name(self.queue, self.compensate)


def arm_name(queue: int, compensate: bool) -> str:
    return "arcface" if queue == 0 else f"q{queue}_{'comp' if compensate else 'nocomp'}"


def stage2_specs(p: Protocol) -> list[RunSpec]:
    """Seed by seed (so a partial protocol has whole paired seeds), largest queue first."""
    out = []
    for seed in p.seeds:
        out.append(RunSpec(f"s2_arcface_seed{seed}", 2, 0, True, seed))
        for q in sorted(p.queues, reverse=True):
            for comp in p.compensations:
                out.append(RunSpec(f"s2_{arm_name(q, comp)}_seed{seed}", 2, q, comp, seed))
    return out


def scratch_specs(p: Protocol, best: tuple[int, bool]) -> list[RunSpec]:
    out = []
    for seed in p.seeds:
        out.append(RunSpec(f"s3_arcface_seed{seed}", 3, 0, True, seed))
        out.append(RunSpec(f"s3_{arm_name(*best)}_seed{seed}", 3, best[0], best[1], seed))
    return out


STAGE1 = RunSpec("s1_arcface", 1, 0, True, 0)


# ------------------------------------------------------------------ configs
def _load_config(path: pathlib.Path) -> Any:
    from broadface_jax import cli

    return cli.config_from_file(path)


def make_config(p: Protocol, spec: RunSpec, workroot: pathlib.Path) -> Any:
    """The run's ConfigDict (``configs/lfw.py`` or, for ``--quick``, ``configs/demo.py:smoke``)."""
    if p.synthetic:
        c = _load_config(REPO / "configs" / "demo.py")
        c.dataset.synthetic.num_identities = 16
        c.dataset.synthetic.heldout_identities = 8
        c.dataset.synthetic.samples_per_identity = 4
        c.num_classes = 16
    else:
        c = _load_config(REPO / "configs" / "lfw.py")
        c.dataset.data_dir = str(p.data_dir)
    c.model.width = p.width
    c.model.embedding_dim = p.embedding_dim
    c.image_size = p.image_size
    c.per_device_batch_size = p.batch
    c.seed = spec.seed
    c.queue.size_per_device = spec.queue
    c.queue.compensate = spec.compensate
    c.queue.chunk_size = min(spec.queue, 1024)
    if spec.stage == 2:
        steps, every = p.stage2_steps, p.stage2_eval_every
        c.lr = p.lr / p.finetune_div
        c.lr_boundaries = (round(0.625 * steps), round(0.875 * steps))
        c.warmup_steps = 0
        c.init_from = str(workroot / STAGE1.name)
        c.init_classifier = True
    else:
        steps = p.stage1_steps if spec.stage == 1 else p.scratch_steps
        every = p.stage1_eval_every if spec.stage == 1 else p.scratch_eval_every
        c.lr = p.lr
        c.lr_boundaries = (round(0.6 * steps), round(0.84 * steps))
        c.warmup_steps = max(1, round(0.04 * steps)) if steps >= 50 else 0
        c.init_from = ""
    c.total_steps = steps
    c.eval_every_steps = every
    c.checkpoint_every_steps = every
    c.keep_checkpoints = steps // every + 2  # every evaluation step stays for the analysis
    c.log_every_steps = max(1, min(every, 20))
    c.eval.targets = tuple(p.curve_targets)
    return c


def quick_model(embedding_dim: int):
    """A conv -> BN -> tanh -> dense encoder (``--quick`` only: compiles in a second)."""
    import flax.linen as nn
    import jax.numpy as jnp

    class _Quick(nn.Module):
        embedding_dim: int

        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(8, (3, 3), strides=(2, 2), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
            x = jnp.tanh(x).reshape((x.shape[0], -1))
            return nn.Dense(self.embedding_dim)(x)

    return _Quick(embedding_dim)


# ------------------------------------------------------------------ reading a run
def read_metrics(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl -> {step: merged record}; the last record of a key per step wins."""
    out: dict[int, dict[str, float]] = {}
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        out.setdefault(int(rec.pop("step")), {}).update(rec)
    return out


def split_curves(metrics: dict[int, dict[str, float]]
                 ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(eval curve {step: {target/metric: v}}, training curve {step: {metric: v}})."""
    evals, trains = {}, {}
    for step, rec in sorted(metrics.items()):
        e = {k[len("eval/"):]: v for k, v in rec.items() if k.startswith("eval/")}
        t = {k: v for k, v in rec.items() if not k.startswith("eval/")}
        if e:
            evals[str(step)] = e
        if t:
            trains[str(step)] = t
    return evals, trains


# ------------------------------------------------------------------ measuring checkpoints
class Measurer:
    """Reloads a run's checkpoints and measures the mechanism and the compensation error."""

    def __init__(self, config: Any, model=None):
        import jax

        from broadface_jax import models, sharding, train_step

        self.config = config
        self.model = model if model is not None else models.build_encoder(config.model)
        self.mesh = sharding.make_mesh(config.mesh)
        abstract, self.shardings = train_step.abstract_train_state(config, self.mesh, self.model)
        from broadface_jax import checkpointing

        self.target = checkpointing.abstract_like(abstract, self.shardings)
        self.embed = train_step.make_embed_fn(config, self.mesh, model=self.model)
        model_ = self.model

        @jax.jit
        def train_forward(params, batch_stats, images, rng):
            out, _ = model_.apply({"params": params, "batch_stats": batch_stats}, images,
                                  train=True, mutable=["batch_stats"], rngs={"dropout": rng})
            return out.astype(jax.numpy.float32)

        self.train_forward = train_forward

    # -- data
    def batch(self, step: int) -> dict:
        from broadface_jax import input_pipeline

        from broadface_jax import train_step

        # the batch of step step + 1 (stream batch step + queue pre-fill batches)
        it = input_pipeline.create_train_iterator(
            self.config, start_step=step + train_step.data_offset(self.config))
        try:
            return next(it)
        finally:
            if hasattr(it, "close"):
                it.close()

    def training_set(self) -> tuple[Any, Any]:
        """(images f32[N, H, W, 3] normalised as in training, labels int[N]), unflipped, once."""
        import numpy as np

        from broadface_jax import input_pipeline

        # Everything that changes the pixels or the epoch-0 order: the whole dataset group
        # (synthetic sizes included) and the seed (synthetic renders depend on it).
        key = (int(self.config.image_size), int(self.config.num_classes), int(self.config.seed),
               self.config.dataset.to_json_best_effort(sort_keys=True))
        if key in _TRAIN_SET_CACHE:
            return _TRAIN_SET_CACHE[key]
        cfg = self.config.copy_and_resolve_references()
        cfg.dataset.random_flip = False
        n = input_pipeline.num_train_examples(cfg)
        it = input_pipeline.create_train_iterator(cfg, start_step=0)
        images, labels, have = [], [], 0
        try:
            while have < n:  # epoch 0 is one permutation of the split: every face once
                b = next(it)
                take = min(n - have, b["label"].shape[0])
                images.append(np.asarray(b["image"][:take], np.float32))
                labels.append(np.asarray(b["label"][:take]))
                have += take
        finally:
            if hasattr(it, "close"):
                it.close()
        out = (np.concatenate(images), np.concatenate(labels))
        _TRAIN_SET_CACHE.clear()
        _TRAIN_SET_CACHE[key] = out
        return out

    def _embed_all(self, params, batch_stats, images) -> Any:
        import numpy as np

        bs = 256
        outs = []
        for a in range(0, images.shape[0], bs):
            chunk = images[a:a + bs]
            n = chunk.shape[0]
            if n < bs:  # one shape: compile once
                chunk = np.concatenate([chunk, np.zeros((bs - n,) + chunk.shape[1:], chunk.dtype)])
            outs.append(self.embed(params, batch_stats, chunk)[:n])
        return np.concatenate(outs)

    # -- one checkpoint
    def measure(self, workdir: pathlib.Path, step: int, lags: tuple[int, ...]) -> dict[str, Any]:
        import jax
        import numpy as np

        from broadface_jax import analysis, checkpointing, train_step

        state = checkpointing.restore(str(workdir), self.target, step)
        assert int(jax.device_get(state.step)) == step, (step, state.step)
        params = jax.device_get(state.params)
        batch_stats = jax.device_get(state.batch_stats)
        kernel = np.asarray(params["classifier"]["kernel"])
        c = int(self.config.num_classes)
        images, labels = self.training_set()
        emb = self._embed_all(params["encoder"], batch_stats, images)
        out: dict[str, Any] = dict(
            step=step,
            train_top1=analysis.classifier_top1(emb, kernel, labels, c),
            center_cos=analysis.center_alignment(emb, kernel, labels, c))
        q = state.queue
        qlabels, qvalid = np.asarray(q.labels), np.asarray(q.valid)
        local = int(self.config.per_device_batch_size)
        cov = analysis.queue_coverage(qlabels, qvalid, q.num_shards, local)
        nxt = np.asarray(self.batch(step)["label"])
        batch_classes = set(nxt.tolist())
        queue_classes = set(qlabels[qvalid].tolist())
        out.update(cov)
        out.update(batch_classes=float(len(batch_classes)),
                   union_classes=float(len(batch_classes | queue_classes)),
                   num_classes=float(c))
        errors = {}
        if q.capacity:
            emb_q, w_q, pos = np.asarray(q.embeddings), np.asarray(q.weights), int(q.position)
            for lag in lags:
                if lag > step + train_step.data_offset(self.config) or lag * local > q.shard_capacity:
                    continue
                rows = analysis.rows_at_lag(pos, q.shard_capacity, q.num_shards, local, lag)
                if not qvalid[rows].all():
                    continue
                b = self.batch(step - lag)
                if not np.array_equal(np.asarray(b["label"]), qlabels[rows]):
                    raise RuntimeError(
                        f"{workdir} step {step}: the queue rows of lag {lag} do not hold batch "
                        f"{step - lag}'s labels; the queue layout or the input stream changed")
                rng = jax.random.fold_in(jax.device_get(state.rng), step - lag)
                cur = np.asarray(self.train_forward(params["encoder"], batch_stats,
                                                    np.asarray(b["image"]), rng))
                errors[str(lag)] = analysis.compensation_errors(
                    cur, emb_q[rows], w_q[rows], kernel[qlabels[rows]])
        out["comp_error"] = errors
        return out

    def evaluate(self, workdir: pathlib.Path, step: int, targets: tuple[str, ...]
                 ) -> dict[str, dict[str, float]]:
        import jax

        from broadface_jax import checkpointing, evaluation
        from broadface_jax.evaluation import embedding

        state = checkpointing.restore(str(workdir), self.target, step)
        bind = embedding.make_uint8_embed_fn(self.config, self.mesh, self.model)
        fn = bind(jax.device_get(state.params["encoder"]), jax.device_get(state.batch_stats))
        return evaluation.run_targets(tuple(targets), fn, self.config)


_TRAIN_SET_CACHE: dict[tuple, Any] = {}


# ------------------------------------------------------------------ one run
def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def run_one(p: Protocol, spec: RunSpec, out: pathlib.Path, workroot: pathlib.Path,
            log=print) -> dict[str, Any]:
    """Trains (or resumes) and measures one run; returns its record (cached in out/runs)."""
    import contextlib

    from broadface_jax import checkpointing, train

    record_path = out / "runs" / f"{spec.name}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text(encoding="utf-8"))
    config = make_config(p, spec, workroot)
    workdir = workroot / spec.name
    model = quick_model(p.embedding_dim) if p.synthetic else None
    times_path = workdir / "analysis_times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    t0 = time.time()
    log(f"[{time.strftime('%H:%M:%S')}] {spec.name}: training "
        f"(queue {spec.queue}, compensate {spec.compensate}, seed {spec.seed}, "
        f"{config.total_steps} steps, lr {config.lr:g})")
    with contextlib.redirect_stdout(sys.stderr):
        train.train_and_evaluate(config, workdir, model=model)
    times["train_s"] = times.get("train_s", 0.0) + time.time() - t0
    _write_json(times_path, times)

    t1 = time.time()
    measurer = Measurer(config, model)
    analysis_path = workdir / "analysis.json"
    measured = json.loads(analysis_path.read_text()) if analysis_path.is_file() else {}
    steps = checkpointing.all_steps(str(workdir))
    if spec.stage in (2, 3):
        for step in steps:
            if str(step) not in measured:
                lags = p.lags if step == steps[-1] else p.lags_every
                measured[str(step)] = measurer.measure(workdir, step, lags)
                _write_json(analysis_path, measured)
    last = steps[-1]
    final_key = f"final_{last}"
    if final_key not in measured:
        targets = p.stage1_final_targets if spec.stage == 1 else p.final_targets
        measured[final_key] = measurer.evaluate(workdir, last, targets)
        if spec.stage == 1:  # the shared start of stage 2 (its step 0)
            measured["start"] = measurer.measure(workdir, last, ())
        _write_json(analysis_path, measured)
    times["analysis_s"] = times.get("analysis_s", 0.0) + time.time() - t1
    _write_json(times_path, times)

    evals, trains = split_curves(read_metrics(workdir))
    record = dict(
        schema=SCHEMA, protocol=p.name, name=spec.name, stage=spec.stage, arm=spec.arm,
        queue=spec.queue, compensate=spec.compensate, seed=spec.seed,
        steps=int(config.total_steps), lr=float(config.lr),
        lr_boundaries=list(config.lr_boundaries), init_from=str(config.init_from),
        curve=evals, train=trains,
        mechanism={k: v for k, v in measured.items() if k.isdigit() or k == "start"},
        final=measured[final_key], final_step=last,
        wall_s=dict(times))
    _write_json(record_path, record)
    # the evaluation-step checkpoints are measured: keep only the last (stage 2 starts
    # from stage 1's; a finished run is never resumed)
    for step in steps[:-1]:
        shutil.rmtree(pathlib.Path(checkpointing.checkpoint_dir(str(workdir))) / str(step),
                      ignore_errors=True)
    log(f"[{time.strftime('%H:%M:%S')}] {spec.name}: done in "
        f"{times['train_s']:.0f} s training + {times['analysis_s']:.0f} s analysis; final "
        + ", ".join(f"{t} {_headline(m)}" for t, m in record["final"].items()))
    return record


def _headline(m: dict[str, float]) -> str:
    if "accuracy" in m:
        return f"{100 * m['accuracy']:.2f}%"
    if "tar@far=1e-3" in m:
        return f"TAR@1e-3 {m['tar@far=1e-3']:.3f}"
    return "?"


# ------------------------------------------------------------------ summary
def load_records(out: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text(encoding="utf-8"))
            for f in sorted((out / "runs").glob("*.json"))]


KEY_METRICS = (("lfw_dev", "accuracy"), ("lfw_people_test", "tar@far=1e-3"),
               ("lfw_people_test", "tar@far=1e-4"), ("cfp_fp", "accuracy"),
               ("synthetic", "accuracy"))


def final_value(rec: dict[str, Any], target: str, metric: str) -> Optional[float]:
    m = rec["final"].get(target)
    return None if m is None or metric not in m else float(m[metric])


def best_step(rec: dict[str, Any], target: str, metric: str) -> Optional[int]:
    pts = [(int(s), v[f"{target}/{metric}"]) for s, v in rec["curve"].items()
           if f"{target}/{metric}" in v]
    if not pts:
        return None
    best = max(v for _, v in pts)
    return min(s for s, v in pts if v == best)


def _arms(records, stage):
    arms: dict[str, dict[int, dict]] = {}
    for r in records:
        if r["stage"] == stage:
            arms.setdefault(r["arm"], {})[r["seed"]] = r
    return arms


def _paired(arms, a, b, fn):
    from broadface_jax import analysis

    seeds = sorted(set(arms.get(a, {})) & set(arms.get(b, {})))
    xs = [fn(arms[a][s]) for s in seeds]
    ys = [fn(arms[b][s]) for s in seeds]
    keep = [i for i in range(len(seeds)) if xs[i] is not None and ys[i] is not None]
    if not keep:
        return None
    out = analysis.paired_interval([xs[i] for i in keep], [ys[i] for i in keep])
    out["seeds"] = [seeds[i] for i in keep]
    return out


def verdict(pi: Optional[dict], sign: int) -> str:
    """seen / not seen / opposite for an expected sign of a paired difference."""
    if pi is None:
        return "pending"
    if pi["n"] < 2 or not math.isfinite(pi["lo"]):
        return "pending (1 seed)"
    lo, hi = (pi["lo"], pi["hi"]) if sign > 0 else (-pi["hi"], -pi["lo"])  # the expected side is > 0
    if lo > 0:
        return "seen"
    if hi < 0:
        return "opposite"
    return "not seen"


def summarise(p: Protocol, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-arm means and the paired comparisons behind each claim."""
    import numpy as np

    acc_target = "synthetic" if p.synthetic else "lfw_dev"
    summary: dict[str, Any] = {"protocol": dataclasses.asdict(p), "stages": {}, "claims": []}
    for stage in (1, 2, 3):
        arms = _arms(records, stage)
        rows = {}
        for arm, by_seed in sorted(arms.items()):
            row = {"seeds": sorted(by_seed)}
            for target, metric in KEY_METRICS:
                vals = [final_value(r, target, metric) for r in by_seed.values()]
                vals = [v for v in vals if v is not None]
                if vals:
                    row[f"{target}/{metric}"] = dict(mean=float(np.mean(vals)),
                                                     sd=float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                                                     values=vals)
            bs = [best_step(r, acc_target, "accuracy") for r in by_seed.values()]
            row["best_step"] = [b for b in bs if b is not None]
            row["wall_s"] = float(np.mean([sum(r["wall_s"].values()) for r in by_seed.values()]))
            rows[arm] = row
        summary["stages"][str(stage)] = rows

    arms2 = _arms(records, 2)
    acc = lambda t, m: (lambda r: final_value(r, t, m))  # noqa: E731
    claims = summary["claims"]
    qs = sorted(p.queues)
    metrics = [(acc_target, "accuracy")] + ([] if p.synthetic else
                                            [("lfw_people_test", "tar@far=1e-3")])
    for target, metric in metrics:
        for q in qs:
            pi = _paired(arms2, arm_name(q, True), "arcface", acc(target, metric))
            claims.append(dict(claim="BroadFace (with compensation) beats ArcFace fine-tuning",
                               table="6a", compare=f"{arm_name(q, True)} - arcface",
                               metric=f"{target}/{metric}", result=pi, verdict=verdict(pi, +1)))
        for lo, hi in zip(qs, qs[1:]):
            pi = _paired(arms2, arm_name(hi, True), arm_name(lo, True), acc(target, metric))
            claims.append(dict(claim="accuracy grows with the queue", table="6a",
                               compare=f"{arm_name(hi, True)} - {arm_name(lo, True)}",
                               metric=f"{target}/{metric}", result=pi, verdict=verdict(pi, +1)))
        big = qs[-1]
        pi = _paired(arms2, arm_name(big, False), arm_name(big, True), acc(target, metric))
        claims.append(dict(claim="without compensation a large queue degrades", table="6a / 7a",
                           compare=f"{arm_name(big, False)} - {arm_name(big, True)}",
                           metric=f"{target}/{metric}", result=pi, verdict=verdict(pi, -1)))
    # compensation reduces the embedding error (Fig. 5a): paired over seeds at the largest lag
    for q in qs:
        for comp in p.compensations:
            def gap(r, q=q):
                errs = [v["comp_error"] for v in r["mechanism"].values() if v.get("comp_error")]
                if not errs:
                    return None
                last = errs[-1]
                lag = max(last, key=int)
                return last[lag]["compensated"] - last[lag]["stale"]
            arm = arm_name(q, comp)
            seeds = sorted(arms2.get(arm, {}))
            vals = [gap(arms2[arm][s]) for s in seeds]
            vals = [v for v in vals if v is not None]
            if vals:
                from broadface_jax import analysis

                pi = analysis.paired_interval(vals, [0.0] * len(vals))
                pi["seeds"] = seeds
            else:
                pi = None
            claims.append(dict(claim="compensation reduces the embedding error (Fig. 5a)",
                               table="5a", compare=f"{arm}: compensated - stale error, largest lag",
                               metric="1 - cos", result=pi, verdict=verdict(pi, -1)))
    # BroadFace peaks sooner (Fig. 7b): from scratch, first step reaching the run's best
    arms3 = _arms(records, 3)
    # Fig. 5a where the embedding moves: from scratch, compensated - stale error at lag 64
    # (mean over the run's measured checkpoints), paired over seeds
    for arm in sorted(a for a in arms3 if a != "arcface"):
        def gap64(r):
            g = [v["comp_error"]["64"]["compensated"] - v["comp_error"]["64"]["stale"]
                 for k, v in r["mechanism"].items()
                 if k.isdigit() and "64" in (v.get("comp_error") or {})]
            return float(np.mean(g)) if g else None
        seeds = sorted(arms3[arm])
        vals = [x for x in (gap64(arms3[arm][sd]) for sd in seeds) if x is not None]
        pi = None
        if vals:
            from broadface_jax import analysis

            pi = analysis.paired_interval(vals, [0.0] * len(vals))
            pi["seeds"] = seeds
        claims.append(dict(claim="compensation reduces the embedding error (Fig. 5a), from scratch",
                           table="5a", compare=f"{arm}: compensated - stale error, lag 64, "
                           "mean over checkpoints", metric="1 - cos", result=pi,
                           verdict=verdict(pi, -1)))
    for arm in sorted(a for a in arms3 if a != "arcface"):
        pi = _paired(arms3, arm, "arcface", lambda r: best_step(r, acc_target, "accuracy"))
        claims.append(dict(claim="BroadFace reaches its best sooner (from scratch)", table="7b",
                           compare=f"{arm} - arcface", metric=f"best step of {acc_target}",
                           result=pi, verdict=verdict(pi, -1)))
        pi = _paired(arms3, arm, "arcface", acc(acc_target, "accuracy"))
        claims.append(dict(claim="BroadFace from scratch ends higher", table="7b",
                           compare=f"{arm} - arcface", metric=f"{acc_target}/accuracy",
                           result=pi, verdict=verdict(pi, +1)))
    return summary


def _fmt_pi(pi: Optional[dict], scale: float, fmt: str = "+.2f") -> str:
    if pi is None:
        return "-"
    if not math.isfinite(pi["lo"]):
        return f"{scale * pi['diff']:{fmt}} (1 seed)"
    return (f"{scale * pi['diff']:{fmt}} [{scale * pi['lo']:{fmt}}, {scale * pi['hi']:{fmt}}] "
            f"(n={int(pi['n'])})")


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = []
    names = {1: "Stage 1 (ArcFace from scratch)", 2: "Stage 2 (fine-tuning from stage 1)",
             3: "From scratch (stage-1 recipe)"}
    for stage, rows in summary["stages"].items():
        if not rows:
            continue
        cols = [c for c in ("lfw_dev/accuracy", "lfw_people_test/tar@far=1e-3",
                            "lfw_people_test/tar@far=1e-4", "cfp_fp/accuracy", "synthetic/accuracy")
                if any(c in r for r in rows.values())]
        lines += [f"### {names[int(stage)]}", "",
                  "| arm | seeds | " + " | ".join(f"{c} (mean ± sd)" for c in cols)
                  + " | best step | wall s/run |",
                  "|---|---|" + "---|" * len(cols) + "---|---|"]
        for arm, r in rows.items():
            cells = []
            for c in cols:
                if c not in r:
                    cells.append("-")
                    continue
                scale = 100 if "accuracy" in c else 1
                sd = r[c]["sd"]
                cells.append(f"{scale * r[c]['mean']:.2f}" + (f" ± {scale * sd:.2f}" if sd is not None else ""))
            lines.append(f"| {arm} | {','.join(map(str, r['seeds']))} | " + " | ".join(cells)
                         + f" | {r['best_step']} | {r['wall_s']:.0f} |")
        lines.append("")
    lines += ["### Claims of the paper", "",
              "Paired differences over seeds (mean [95% t interval]); accuracies in points, "
              "TAR and errors as fractions.", "",
              "| claim | paper | comparison | metric | paired difference | verdict |",
              "|---|---|---|---|---|---|"]
    for c in summary["claims"]:
        scale = 100 if "accuracy" in c["metric"] else 1
        lines.append(f"| {c['claim']} | {c['table']} | {c['compare']} | {c['metric']} | "
                     f"{_fmt_pi(c['result'], scale, '+.2e' if c['metric'] == '1 - cos' else '+.2f')}"
                     f" | {c['verdict']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ figures
def _legend(ax, size: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def draw_figures(p: Protocol, records: list[dict[str, Any]], out: pathlib.Path) -> list[str]:
    """The PNGs (learning curves, finals with intervals, queue x compensation, error vs lag, mechanism)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy import stats

    acc_key = ("synthetic" if p.synthetic else "lfw_dev") + "/accuracy"
    written = []

    def save(fig, name):
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(name)

    def band(ax, runs, getter, label, color=None):
        series = [getter(r) for r in runs]
        series = [s for s in series if s]
        if not series:
            return
        steps = sorted(set.intersection(*[set(s) for s in series]))
        if not steps:
            return
        ys = np.array([[s[k] for k in steps] for s in series])
        m = ys.mean(0)
        line, = ax.plot(steps, m, marker="o", ms=3, label=f"{label} (n={len(series)})", color=color)
        if len(series) > 1:
            sd = ys.std(0, ddof=1)
            ax.fill_between(steps, m - sd, m + sd, alpha=0.2, color=line.get_color())

    def curve_of(key, start=None):
        def get(r):
            pts = {int(s): v[key] for s, v in r["curve"].items() if key in v}
            if start is not None and pts:
                pts[0] = start
            return pts
        return get

    stage1 = [r for r in records if r["stage"] == 1]
    start = {}
    if stage1:
        f = stage1[0]["final"]
        for key in (acc_key, "lfw_people_test/tar@far=1e-3"):
            t, m = key.split("/")
            if t in f and m in f[t]:
                start[key] = f[t][m]
    # learning curves per stage
    for stage, title in ((1, "stage 1: ArcFace from scratch"), (2, "stage 2: fine-tuning"),
                         (3, "from scratch")):
        runs = [r for r in records if r["stage"] == stage]
        if not runs:
            continue
        keys = [acc_key] + ([] if p.synthetic else ["lfw_people_test/tar@far=1e-3"])
        fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            by_arm: dict[str, list] = {}
            for r in runs:
                by_arm.setdefault(r["arm"], []).append(r)
            for arm, rs in sorted(by_arm.items()):
                band(ax, rs, curve_of(key, start.get(key) if stage == 2 else None), arm)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            _legend(ax, 7)
        save(fig, f"curves_stage{stage}.png")

    # finals per arm with 95% intervals (stage 2), and queue x compensation
    runs2 = [r for r in records if r["stage"] == 2]
    if runs2:
        keys = [acc_key] + ([] if p.synthetic else ["lfw_people_test/tar@far=1e-3",
                                                     "lfw_people_test/tar@far=1e-4"])
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
        arms = _arms(records, 2)
        order = ["arcface"] + [arm_name(q, c) for q in sorted(p.queues) for c in (True, False)]
        order = [a for a in order if a in arms]
        for ax, key in zip(axes[0], keys):
            t, m = key.split("/")
            for i, arm in enumerate(order):
                vals = [final_value(r, t, m) for r in arms[arm].values()]
                vals = np.array([v for v in vals if v is not None])
                if vals.size == 0:
                    continue
                half = (stats.t.ppf(0.975, vals.size - 1) * vals.std(ddof=1) / np.sqrt(vals.size)
                        if vals.size > 1 else 0.0)
                ax.errorbar([i], [vals.mean()], yerr=[half], fmt="o", capsize=4)
                ax.scatter([i] * vals.size, vals, s=8, color="gray", alpha=0.6)
            ax.set_xticks(range(len(order)))
            ax.set_xticklabels(order, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel(f"final {key}")
            ax.set_title("stage 2 finals (mean, 95% t interval, seeds)")
            ax.grid(alpha=0.3)
        save(fig, "finals_stage2.png")

        fig, ax = plt.subplots(figsize=(5, 4))
        t, m = acc_key.split("/")
        base = [final_value(r, t, m) for r in arms.get("arcface", {}).values()]
        base = [v for v in base if v is not None]
        for comp in (True, False):
            xs, ys, es = [], [], []
            for q in sorted(p.queues):
                vals = [final_value(r, t, m) for r in arms.get(arm_name(q, comp), {}).values()]
                vals = np.array([v for v in vals if v is not None])
                if vals.size:
                    xs.append(q)
                    ys.append(vals.mean())
                    es.append(stats.t.ppf(0.975, vals.size - 1) * vals.std(ddof=1) / np.sqrt(vals.size)
                              if vals.size > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3,
                            label=f"compensation {'on' if comp else 'off'}")
        if base:
            ax.axhline(np.mean(base), color="red", ls="--", label=f"ArcFace (n={len(base)})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queue per device")
        ax.set_ylabel(f"final {acc_key}")
        ax.set_title("queue size x compensation (Table 6a / Fig. 7a)")
        ax.grid(alpha=0.3)
        _legend(ax, 7)
        save(fig, "queue_compensation.png")

        # compensation error vs lag (Fig. 5a), at each arm's last measured step
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for arm in order:
            if arm == "arcface":
                continue
            for kind, ls in (("stale", "--"), ("compensated", "-")):
                series = []
                for r in arms[arm].values():
                    errs = [v["comp_error"] for k, v in sorted(r["mechanism"].items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else -1)
                            if v.get("comp_error")]
                    if errs:
                        series.append({int(k): e[kind] for k, e in errs[-1].items()})
                if series:
                    lags = sorted(set.intersection(*[set(s) for s in series]))
                    ax.plot(lags, [np.mean([s[k] for s in series]) for k in lags], ls=ls, marker="o",
                            ms=3, label=f"{arm} {kind}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("lag (steps)")
        ax.set_ylabel("mean 1 - cos(current, queued)")
        ax.set_title("compensation error vs lag (Fig. 5a)")
        ax.grid(alpha=0.3)
        _legend(ax, 6)
        save(fig, "compensation_error.png")

        # mechanism curves
        keys = [("train_top1", "classifier top-1 on the training set"),
                ("center_cos", "mean cos(W_y, class mean)"),
                ("union_classes", "classes with a positive gradient per step"),
                ("queue_drift", "mean cos(W⁻, W_y) over the queue")]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
        for ax, (key, title) in zip(axes[0], keys):
            for arm in order:
                rs = list(arms[arm].values())
                if key == "queue_drift":
                    if arm == "arcface":
                        continue
                    get = lambda r: {int(s): v["queue_drift"] for s, v in r["train"].items()  # noqa: E731
                                     if "queue_drift" in v and v.get("queue_used", 1) > 0}
                else:
                    def get(r, key=key):
                        pts = {int(s): v[key] for s, v in r["mechanism"].items() if s.isdigit()}
                        if stage1 and key in stage1[0]["mechanism"].get("start", {}):
                            pts[0] = stage1[0]["mechanism"]["start"][key]
                        return pts
                band(ax, rs, get, arm)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("stage-2 step")
            ax.grid(alpha=0.3)
            if key == "union_classes":
                ax.set_yscale("log")
        _legend(axes[0][0], 6)
        save(fig, "mechanism_stage2.png")
    return written


# ------------------------------------------------------------------ main
def report(p: Protocol, out: pathlib.Path, meta: dict[str, Any]) -> dict[str, Any]:
    records = [r for r in load_records(out) if r.get("protocol") == p.name]
    summary = summarise(p, records)
    summary["figures"] = draw_figures(p, records, out)
    summary["meta"] = meta
    summary["runs_done"] = sorted(r["name"] for r in records)
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def best_broadface_arm(p: Protocol, records: list[dict[str, Any]]) -> tuple[int, bool]:
    """Highest mean final accuracy over the arms whose every seed is done, else the largest queue + comp."""
    import numpy as np

    target = "synthetic" if p.synthetic else "lfw_dev"
    arms = _arms(records, 2)
    best, best_acc = (max(p.queues), True), -1.0
    if all(len(arms.get(arm_name(q, c), {})) == len(p.seeds) for q in p.queues for c in p.compensations):
        for q in p.queues:
            for c in p.compensations:
                vals = [final_value(r, target, "accuracy") for r in arms[arm_name(q, c)].values()]
                if np.mean(vals) > best_acc:
                    best, best_acc = (q, c), float(np.mean(vals))
    return best


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (JSON per run, summary, PNGs)")
    ap.add_argument("--workdir", default=None,
                    help="parent of the run workdirs (default runs/paper_analyses[_quick])")
    ap.add_argument("--quick", action="store_true", help="the few-step smoke protocol")
    ap.add_argument("--stages", default="1,2,3", help="stages to run (comma-separated)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (full protocol)")
    ap.add_argument("--report_only", action="store_true",
                    help="only rebuild summary and figures from the finished runs")
    args = ap.parse_args(argv)
    try:
        args.stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--stages={args.stages!r} must be comma-separated stage numbers (1, 2, 3)")
    if not args.stages or any(s not in (1, 2, 3) for s in args.stages):
        ap.error(f"--stages={args.stages!r}: choose among 1, 2, 3")
    if args.seeds < 1:
        ap.error(f"--seeds={args.seeds} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import jax

    p = quick_protocol() if args.quick else full_protocol(args.seeds)
    out = pathlib.Path(args.out).resolve()
    workroot = pathlib.Path(args.workdir or ("runs/paper_analyses_quick" if args.quick
                                             else "runs/paper_analyses")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(shlex.quote(a) for a in ["python -m benchmarks.paper_analyses",
                                            *(argv if argv is not None else sys.argv[1:])])
    meta = dict(command=cmd, machine=f"{platform.machine()}, {os.cpu_count()} CPUs, "
                f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
                jax=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))

    def log(msg):
        print(msg, flush=True)

    if not args.report_only:
        if not p.synthetic and not pathlib.Path(p.data_dir).is_dir():
            raise FileNotFoundError(
                f"{p.data_dir} does not exist: prepare LFW first with python -m "
                "broadface_jax.prepare --dataset lfw --manual_dir ../shared/data/lfw "
                f"--data_dir {p.data_dir}")
        t0 = time.time()
        if any(s in args.stages for s in (1, 2)):
            run_one(p, STAGE1, out, workroot, log)  # stage 2 needs it
        if 2 in args.stages:
            for spec in stage2_specs(p):
                run_one(p, spec, out, workroot, log)
                report(p, out, meta)
        if 3 in args.stages:
            best = best_broadface_arm(p, [r for r in load_records(out) if r["protocol"] == p.name])
            for spec in scratch_specs(p, best):
                run_one(p, spec, out, workroot, log)
                report(p, out, meta)
        meta["this_call_s"] = time.time() - t0
    summary = report(p, out, meta)
    log(f"\nCommand: {cmd}\n{meta['machine']}\n")
    log(summary_markdown(summary))
    return summary


if __name__ == "__main__":
    main()
