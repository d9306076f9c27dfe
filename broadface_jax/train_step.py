"""The BroadFace train step: one pure function (state, batch) -> (state, metrics).

Per step (paper section 3.2, Eqs. 7-9):

1. Encoder forward on the batch: embeddings e (unnormalised).
2. Classifier loss over X ∪ E: the batch losses l(e_i) plus the losses of the
   compensated queue rows l(e*_j) (Eq. 7), summed and divided by |X ∪ E|
   (Eq. 9). The queue is data: no gradient through e*.
3. One backward pass gives both gradients. The encoder must see only the
   batch loss, mean over |X| (Eq. 8); the classifier must see Eq. 9. Both are
   the same batch terms with different normalisers, so the embeddings pass
   through `scale_gradient(e, |X ∪ E| / |X|)`: identity forward, and the
   encoder's gradient becomes exactly that of Eq. 8, while the classifier's is
   exactly that of Eq. 9.
4. optax update (separate encoder / classifier optimizers via multi_transform;
   see `build_optimizer`).
5. Enqueue the batch's embeddings with the classifier rows W_y they were used
   with (pre-update), after the update.

The loss is `losses.build(config.loss)` (ArcFace, CosFace, combined margin,
CurricularFace, ...): one per-example loss for the batch and the queue terms. A
stateful loss (CurricularFace's t) keeps its state in `TrainState.loss_state`,
updated once per step from the batch.

With an empty queue (capacity 0, or nothing valid yet) this is exactly a plain
margin-softmax (ArcFace / CosFace / ...) step.

With ``config.classifier.sample_rate < 1`` steps 2-3 score the batch and the
queue against a per-shard sample of W's rows (`class_sampling`: the classes of
the batch and of the queue, plus uniform negatives); W's gradient is zero
outside it and the optimizer runs on the whole W, as PartialFC_V2's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from broadface_jax import (class_sampling, config_check, losses, optim, queue as queue_lib,
                           sharding)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # i32[]
    params: Any  # {'encoder': ..., 'classifier': {'kernel': f32[C_pad, D]}}
    batch_stats: Any  # encoder BatchNorm statistics
    opt_state: Any
    queue: queue_lib.QueueState
    rng: jax.Array  # u32[2]; dropout keys are fold_in(rng, step)
    loss_state: Any = flax.struct.field(default_factory=dict)  # {} or e.g. {'t': f32[]}


# ------------------------------------------------------------------ optimizer

PARTS = config_check.PARTS  # ("encoder", "classifier")


def build_schedule(config: Any) -> optax.Schedule:
    """The base lr at (0-based) step s: the paper's 5e-3, x0.1 at 50k and 70k.

    ``lr * lr_decay ** #{b in lr_boundaries : b <= s}``: step b is the first
    with the decayed lr (after b updates), as PyTorch's ``MultiStepLR`` stepped
    once per iteration. With ``warmup_steps = w > 0`` the first w steps ramp
    linearly, ``lr * (s + 1) / w`` (step 0 already moves, step w - 1 uses the
    full lr), then the step schedule takes over (boundaries count from step 0).
    Each part applies this times its ``optimizer.<part>.lr_scale``.
    """
    base = optax.piecewise_constant_schedule(
        float(config.lr), {int(b): float(config.lr_decay) for b in config.lr_boundaries})
    warmup = int(config.warmup_steps)
    if warmup <= 0:
        return base

    def schedule(step):
        return jnp.where(step < warmup, float(config.lr) * (step + 1) / warmup, base(step))

    return schedule


def _part_optimizer(opt_config: Any, schedule: optax.Schedule,
                    clip_norm: float) -> optax.GradientTransformation:
    """clip (this part's global norm) -> + weight decay -> SGD momentum / Adam -> x lr.

    The order is PyTorch's (and insightface's): ``clip_grad_norm_`` on the raw
    gradient, then ``optim.SGD(weight_decay=wd, momentum=mu)``, i.e.
    ``g += wd * p; buf = mu * buf + g; p -= lr * buf``. The lr is injected
    (``optax.inject_hyperparams``), so the value applied at each update is in
    the optimizer state and is what the step logs (`applied_lr`).
    """
    lr_scale = float(opt_config.lr_scale)
    lr = lambda step: schedule(step) * lr_scale  # noqa: E731
    parts = []
    if clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if float(opt_config.weight_decay) > 0:
        # PyTorch SGD semantics (as in insightface): decay added to the gradient
        # before momentum, on every parameter.
        parts.append(optax.add_decayed_weights(float(opt_config.weight_decay)))
    parts.append(optim.REGISTRY[opt_config.name](lr, opt_config))  # names: config_check
    return optax.chain(*parts)


def build_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Separate optimizers for the encoder and the classifier (multi_transform).

    ``config.grad_clip_norm > 0`` clips **each part separately** to that L2
    norm, taken over all of the part's gradient leaves (``clip_by_global_norm``
    inside the part's chain): the encoder's clip is insightface's
    ``clip_grad_norm_(backbone.parameters(), max_norm=5)``; insightface leaves
    its classifier unclipped, here the classifier is clipped by its own norm.
    The optimizer of each part is ``optim.REGISTRY[config.optimizer.<part>.name]``.
    Returns (tx, base schedule).
    """
    config_check.check(config, only=("optimizer", "lr", "lr_boundaries", "lr_decay",
                                      "warmup_steps", "grad_clip_norm"))
    schedule = build_schedule(config)
    clip = float(config.grad_clip_norm)

    def labels(params):
        return {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}

    tx = optax.multi_transform(
        {part: _part_optimizer(config.optimizer[part], schedule, clip) for part in PARTS},
        labels)
    return tx, schedule


def _is_injected(x: Any) -> bool:
    return isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def applied_lr(opt_state: Any) -> dict[str, jax.Array]:
    """{part: lr} as stored by `inject_hyperparams` at the last update.

    On the state returned by an update this is the lr that update applied (on
    a fresh state: the lr of step 0).
    """
    out = {}
    for part in PARTS:
        found = [x for x in jax.tree.leaves(opt_state.inner_states[part], is_leaf=_is_injected)
                 if _is_injected(x)]
        out[part] = found[0].hyperparams["learning_rate"]
    return out



def lr_metrics(config: Any, opt_state: Any) -> dict[str, jax.Array]:
    """``lr`` (the encoder's applied lr), plus ``lr_encoder`` / ``lr_classifier``
    when the parts' lr_scale differ."""
    lrs = applied_lr(opt_state)
    out = {"lr": lrs["encoder"]}
    scales = {float(config.optimizer[p].lr_scale) for p in PARTS}
    if len(scales) > 1:
        out.update({f"lr_{p}": lrs[p] for p in PARTS})
    return out


# ------------------------------------------------------------------ state

def padded_num_classes(config: Any, mesh: Mesh) -> int:
    """C rounded up to a multiple of the classifier shards (padding rows are masked)."""
    n = sharding.classifier_shards(mesh, config.classifier_sharding)
    return int(math.ceil(int(config.num_classes) / n) * n)


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a run builds once from its config and hands to every function that needs it.

    ``model``: the encoder module (``models.build_encoder``, BatchNorm groups
    from the mesh); ``loss``: ``losses.build(config.loss)``; ``tx`` and
    ``schedule``: :func:`build_optimizer`.
    """

    model: Any
    loss: losses.Loss
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def _build_encoder(config: Any, mesh: Mesh | None) -> Any:
    from broadface_jax import models
    # The batch's shard count: the BatchNorm groups of model.batch_norm='per_device'.
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES) if mesh is not None else None
    return models.build_encoder(config.model, batch_shards=shards)


def build_parts(config: Any, mesh: Mesh | None = None, model: Any = None) -> Parts:
    """Builds the encoder (unless ``model`` is given), the loss and the optimizer, once.

    ``mesh`` sets the BatchNorm groups of ``model.batch_norm='per_device'`` (one
    per batch shard; eval mode and initialisation ignore them).
    """
    model = model if model is not None else _build_encoder(config, mesh)
    tx, schedule = build_optimizer(config)
    return Parts(model=model, loss=losses.build(config.loss), tx=tx, schedule=schedule)


def resolve_parts(config: Any, mesh: Mesh | None, model: Any, parts: Parts | None) -> Parts:
    """``parts`` as given, else built from the config (and ``model`` when given)."""
    if parts is not None:
        if model is not None and model is not parts.model:
            raise ValueError("pass the encoder either as model= or in parts=, not both")
        return parts
    return build_parts(config, mesh, model)


def queue_chunk(config: Any, mesh: Mesh) -> int:
    """Queue rows per device per chunk of the queue loss.

    With W split over n class shards, each device gathers its n-device group's
    queue rows for a chunk and scores them against its C/n classes, so the
    per-device logits are n x chunk x C/n. Dividing the configured chunk by n
    keeps them at chunk_size x C / n: the logits shrink with the classifier.
    """
    chunk = int(config.queue.chunk_size)
    n = sharding.classifier_shards(mesh, config.classifier_sharding)
    return max(1, chunk // n) if chunk else 0


def queue_capacity(config: Any, mesh: Mesh) -> int:
    return int(config.queue.size_per_device) * mesh.size


def validate_config(config: Any, mesh: Mesh) -> None:
    """Checks the sizes the step relies on, with errors naming the field.

    The fields on their own (and the ring buffer's batch multiple) are
    ``config_check``'s rules; here only what needs the mesh: the queue chunk
    per classifier shard, the class sample per shard, and a resolved class count.
    """
    config_check.check(config, only=("per_device_batch_size", "queue", "num_classes",
                                      "classifier", "classifier_sharding"))
    per_dev_q = int(config.queue.size_per_device)
    b = int(config.per_device_batch_size)
    chunk = queue_chunk(config, mesh)
    if per_dev_q and chunk and per_dev_q % min(chunk, per_dev_q):
        raise config_check.ConfigError(
            f"config.queue.chunk_size={config.queue.chunk_size} (per classifier shard: "
            f"{chunk}) must divide config.queue.size_per_device={per_dev_q}")
    if int(config.num_classes) == 0:
        raise config_check.ConfigError(
            "config.num_classes=0: resolve it from the data set first "
            "(input_pipeline.resolve_num_classes)")
    n = sharding.classifier_shards(mesh, config.classifier_sharding)
    found = class_sampling.problems(config, n, padded_num_classes(config, mesh) // n,
                                    b * mesh.size)
    if found:
        raise config_check.ConfigError(found[0])


def _init_fn(config: Any, mesh: Mesh, parts: Parts) -> Callable[[jax.Array], TrainState]:
    from broadface_jax import models

    model, tx, loss = parts.model, parts.tx, parts.loss
    c_pad = padded_num_classes(config, mesh)
    dim = int(config.model.embedding_dim)
    size = int(config.image_size)

    def init(rng):
        k_model, k_cls, k_state = jax.random.split(rng, 3)
        variables = models.init_variables(model, size, k_model)
        # insightface: classifier rows ~ N(0, 0.01^2)
        kernel = 0.01 * jax.random.normal(k_cls, (c_pad, dim), jnp.float32)
        params = {"encoder": variables["params"], "classifier": {"kernel": kernel}}
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            queue=queue_lib.init_queue(queue_capacity(config, mesh), dim, mesh.size),
            rng=k_state,
            loss_state=loss.init_state(),
        )

    return init


def abstract_train_state(config: Any, mesh: Mesh, model=None, *, parts: Parts | None = None
                         ) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStruct state, shardings) without allocating anything."""
    validate_config(config, mesh)
    init = _init_fn(config, mesh, resolve_parts(config, mesh, model, parts))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    return abstract, state_shardings(abstract, config, mesh)


def create_train_state(config: Any, mesh: Mesh, rng: jax.Array, model=None, *,
                       parts: Parts | None = None) -> tuple[TrainState, TrainState]:
    """Initialises the state born sharded: eval_shape -> rules -> jit(out_shardings)."""
    parts = resolve_parts(config, mesh, model, parts)
    _, shardings = abstract_train_state(config, mesh, parts=parts)
    state = jax.jit(_init_fn(config, mesh, parts), out_shardings=shardings)(rng)
    return state, shardings


def state_shardings(abstract_state: TrainState, config: Any, mesh: Mesh) -> TrainState:
    return sharding.tree_shardings(abstract_state, mesh, sharding.partition_rules(config))


# ------------------------------------------------------------------ step

def build_train_step(config: Any, model=None, mesh: Mesh | None = None, *,
                     parts: Parts | None = None) -> Callable[[TrainState, dict], tuple]:
    """The pure (un-jitted) step function.

    `mesh` sets the queue chunk (see `queue_chunk`) and the BatchNorm groups of
    ``model.batch_norm='per_device'`` (one per batch shard).
    """
    parts = resolve_parts(config, mesh, model, parts)
    model, loss, tx = parts.model, parts.loss, parts.tx
    num_classes = int(config.num_classes)
    chunk = queue_chunk(config, mesh) if mesh is not None else int(config.queue.chunk_size)
    use_comp = bool(config.queue.compensate)
    matmul_dtype = str(config.queue.matmul_dtype)
    rate = class_sampling.sample_rate(config)
    sampling = rate < 1.0  # 1.0: every class, today's step unchanged
    n_shards = (sharding.classifier_shards(mesh, config.classifier_sharding)
                if mesh is not None else 1)
    shard_sh = None
    if sampling and mesh is not None:
        spec = sharding.classifier_spec(config.classifier_sharding)
        shard_sh = jax.sharding.NamedSharding(mesh, spec) if spec else None

    def sample_for(state: TrainState, labels: jax.Array) -> class_sampling.ClassSample:
        rows_per_shard = state.params["classifier"]["kernel"].shape[0] // n_shards
        return class_sampling.sample_classes(
            class_sampling.step_key(state.rng, state.step), labels, state.queue.labels,
            state.queue.valid, num_shards=n_shards, rows_per_shard=rows_per_shard,
            sample_per_shard=class_sampling.sample_size(rate, rows_per_shard),
            num_classes=num_classes, shard_sharding=shard_sh)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images, labels = batch["image"], batch["label"].astype(jnp.int32)
        bsz = labels.shape[0]
        q = state.queue
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        smp = sample_for(state, labels) if sampling else None

        def loss_fn(params):
            emb, new_vars = model.apply(
                {"params": params["encoder"], "batch_stats": state.batch_stats},
                images, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
            emb = emb.astype(jnp.float32)
            kernel = params["classifier"]["kernel"]
            n_valid = jnp.sum(q.valid.astype(jnp.float32))  # 0 for capacity 0
            if sampling:  # score against the sampled rows only (class_sampling)
                kernel_n = losses.l2_normalize(class_sampling.gather_rows(kernel, smp))
                scored = dict(class_mask=smp.valid)
                batch_labels = smp.position[labels]  # always sampled (validate_config)
                q_labels = smp.position[q.labels]  # -1: class did not fit, row left out
                n_scored = jnp.sum((q.valid & (q_labels >= 0)).astype(jnp.float32))
                q_kw = dict(scored, scored_labels=q_labels, num_classes=None)
                n_cls = None
            else:
                kernel_n = losses.l2_normalize(kernel)
                scored, batch_labels, n_scored, n_cls = {}, labels, n_valid, num_classes
                q_kw = dict(num_classes=num_classes)
            denom = bsz + n_scored
            # Encoder sees d/de of mean over X (Eq. 8); classifier sees Eq. 9.
            emb_scaled = losses.scale_gradient(emb, denom / bsz)
            # A stateful loss updates its state from the batch; the queue uses the new one.
            batch_losses, loss_state = loss.batch(
                emb_scaled, kernel_n, batch_labels, state.loss_state, n_cls, **scored)
            if q.capacity:
                q_sum, drift_sum, _ = queue_lib.queue_loss_sum(
                    q, kernel, kernel_n, loss, chunk_size=chunk,
                    compensate_embeddings=use_comp, loss_state=loss_state,
                    matmul_dtype=matmul_dtype, **q_kw)
            else:
                q_sum = drift_sum = jnp.zeros((), jnp.float32)
            loss_cls = (jnp.sum(batch_losses) + q_sum) / denom
            aux = dict(emb=emb, batch_stats=new_vars["batch_stats"],
                       loss_encoder=jnp.mean(batch_losses),
                       queue_drift=drift_sum / jnp.maximum(n_valid, 1.0),
                       queue_used=n_valid, queue_scored=n_scored, loss_state=loss_state)
            return loss_cls, aux

        (loss_cls, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # W⁻: the rows used with these embeddings, i.e. before this update.
        w_used = jnp.take(state.params["classifier"]["kernel"], labels, axis=0)
        new_queue = queue_lib.enqueue(q, jax.lax.stop_gradient(aux["emb"]), w_used, labels)
        metrics = dict(
            loss_encoder=aux["loss_encoder"],
            loss_classifier=loss_cls,
            queue_fill=queue_lib.fill(new_queue),
            queue_used=aux["queue_used"],
            queue_drift=aux["queue_drift"],
            **lr_metrics(config, opt_state),  # the lr this update applied
            grad_norm_encoder=optax.tree.norm(grads["encoder"]),
            grad_norm_classifier=optax.tree.norm(grads["classifier"]),
            **{f"loss_state_{k}": v for k, v in aux["loss_state"].items()},
        )
        if sampling:
            metrics.update(
                sample_rows_per_shard=jnp.float32(smp.local.shape[1]),
                sample_positives_batch=smp.positives_batch,
                sample_positives_queue=smp.positives_queue,
                sample_positives_max_shard=smp.positives_max_shard,
                sample_queue_dropped=aux["queue_used"] - aux["queue_scored"])
        new_state = state.replace(step=state.step + 1, params=params,
                                  batch_stats=aux["batch_stats"], opt_state=opt_state,
                                  queue=new_queue, loss_state=aux["loss_state"])
        return new_state, metrics

    return step_fn


def data_offset(config: Any) -> int:
    """Batches of the data stream read before step 1: ``queue.prefill_steps`` (the
    training batch of step s >= 1 is stream batch ``data_offset + s - 1``)."""
    return int(config.queue.prefill_steps)


def build_prefill_step(config: Any, model=None, mesh: Mesh | None = None, *,
                       parts: Parts | None = None) -> Callable[[TrainState, dict], TrainState]:
    """The pure queue pre-fill: (state, batch) -> state with the batch enqueued.

    A train-mode forward pass (the embeddings a step would compute) with the
    current classifier rows W_y as W⁻; parameters, BatchNorm statistics,
    optimizer, step and loss state are unchanged (no update). Dropout keys are
    ``fold_in(fold_in(rng, -1 mod 2^32), queue position)`` (apart from any step's).
    """
    model = model if parts is None else parts.model
    model = model if model is not None else _build_encoder(config, mesh)

    def prefill_fn(state: TrainState, batch: dict) -> TrainState:
        labels = batch["label"].astype(jnp.int32)
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, jnp.uint32(0xFFFFFFFF)),
                                 state.queue.position)
        emb, _ = model.apply({"params": state.params["encoder"],
                              "batch_stats": state.batch_stats},
                             batch["image"], train=True, mutable=["batch_stats"],
                             rngs={"dropout": rng})
        w_used = jnp.take(state.params["classifier"]["kernel"], labels, axis=0)
        return state.replace(queue=queue_lib.enqueue(
            state.queue, emb.astype(jnp.float32), w_used, labels))

    return prefill_fn


def make_prefill_step(config: Any, mesh: Mesh, state_shardings: TrainState, model=None, *,
                      parts: Parts | None = None):
    """jax.jit of `build_prefill_step` with the state's shardings (state donated)."""
    batch_sh = {"image": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)}
    return jax.jit(build_prefill_step(config, model, mesh, parts=parts),
                   in_shardings=(state_shardings, batch_sh), out_shardings=state_shardings,
                   donate_argnums=(0,))


def make_train_step(config: Any, mesh: Mesh, state_shardings: TrainState, model=None,
                    step_fn: Callable | None = None, *, parts: Parts | None = None):
    """jax.jit of the step with explicit in/out shardings and a donated state."""
    step_fn = step_fn or build_train_step(config, model, mesh, parts=parts)
    batch_sh = {"image": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)}
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))


# ------------------------------------------------------------------ embeddings

def make_embed_fn(config: Any, mesh: Mesh, model=None):
    """embed(encoder_params, batch_stats, images f32[N,H,W,3]) -> np.float32[N, D].

    Images are normalised already. N is padded up to a multiple of the device
    count (rows sharded over every device), so each distinct N compiles once;
    callers that loop should use a fixed batch size. With several processes
    the call is collective: every process calls it with the same N, each
    process's array supplies only the rows its own devices hold (the other
    rows are not read: zeros will do; rows that a 'model' axis spanning
    processes replicates must be the same on each), and every process gets
    all N embeddings back (all-gathered). ``evaluation.embedding``'s
    ``make_uint8_embed_fn`` fills each process's rows this way.
    ``model``: the run's encoder (``Parts.model``); None builds it.
    """
    model = model if model is not None else _build_encoder(config, None)
    batch_sh = sharding.batch_sharding(mesh)

    @jax.jit
    def apply(params, batch_stats, images):
        out = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
        return out.astype(jnp.float32)

    def embed(params, batch_stats, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        n = images.shape[0]
        pad = (-n) % mesh.size
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
        x = jax.make_array_from_callback(images.shape, batch_sh, lambda idx: images[idx])
        out = apply(params, batch_stats, x)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(out)[:n]

    return embed
