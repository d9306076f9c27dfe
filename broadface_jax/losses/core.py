"""The loss object every loss is used through, and the shared JAX helpers.

``build(config.loss) -> Loss`` resolves the name and fields through
``losses.REGISTRY`` (see the package docstring for the contract). Everything
works on a one-hot mask of the labels rather than gathers along the class
axis, so that it runs unchanged when the classifier is sharded over classes
(the softmax normaliser becomes a cross-shard reduction under jit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from broadface_jax import losses as registry


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||, safe at x = 0 (returns 0 there, with a finite gradient)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def cosines(embeddings: jax.Array, kernel_normalized: jax.Array, labels: jax.Array,
            product: Callable[[jax.Array, jax.Array], jax.Array] | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(cos f32[N, C], onehot bool[N, C], cos_y f32[N]) of embeddings against W rows.

    The embeddings are L2-normalised here; ``kernel_normalized`` already is (once
    per step, shared by the batch and every queue chunk). ``product(e_n, W_n)``
    computes the f32[N, C] cosines (None: ``e_n @ W_n.T`` in float32; the
    queue passes ``queue.queue_cosines`` for ``config.queue.matmul_dtype``).
    """
    e = l2_normalize(embeddings.astype(jnp.float32))
    cos = e @ kernel_normalized.T if product is None else product(e, kernel_normalized)
    classes = jnp.arange(kernel_normalized.shape[0])
    onehot = labels[:, None] == classes[None, :]
    cos_y = jnp.sum(jnp.where(onehot, cos, 0.0), axis=-1)
    return cos, onehot, cos_y


def softmax_cross_entropy(logits: jax.Array, onehot: jax.Array,
                          num_classes: int | None = None,
                          class_mask: jax.Array | None = None) -> jax.Array:
    """Per-row -log softmax(logits) at the label; classes >= num_classes are padding.

    ``class_mask`` (bool[C], optional) marks the real columns when the padding
    is not a suffix (a sampled classifier: `class_sampling`); False columns
    leave the softmax.
    """
    target = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    if num_classes is not None and num_classes < logits.shape[-1]:
        classes = jnp.arange(logits.shape[-1])
        logits = jnp.where(classes[None, :] < num_classes, logits, -jnp.inf)
    if class_mask is not None:
        logits = jnp.where(class_mask[None, :], logits, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1) - target


@dataclasses.dataclass(frozen=True)
class Loss:
    """A loss chosen by name with its resolved fields (static: closed over under jit)."""

    name: str
    fields: tuple[tuple[str, float], ...]  # ('s', 64.0), ('m2', 0.5), ...
    logits_fn: Callable[..., jax.Array]
    init_state_fn: Callable[[], Any] | None = None
    update_state_fn: Callable[[Any, jax.Array], Any] | None = None

    @property
    def params(self) -> dict[str, float]:
        return dict(self.fields)

    def init_state(self) -> Any:
        """The state of a fresh run (``{}`` for a stateless loss)."""
        return self.init_state_fn() if self.init_state_fn is not None else {}

    def per_example(self, embeddings: jax.Array, kernel_normalized: jax.Array,
                    labels: jax.Array, state: Any = None,
                    num_classes: int | None = None,
                    class_mask: jax.Array | None = None,
                    product: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                    ) -> jax.Array:
        """f32[N] losses of (unnormalised) embeddings under ``state`` (not updated).

        Args:
          embeddings: f[N, D], normalised here.
          kernel_normalized: f32[C, D] classifier rows, already L2-normalised.
          labels: int[N] in [0, num_classes).
          state: the loss state to score with (``{}``/None when stateless).
          num_classes: the real class count when ``kernel_normalized`` has
            padding rows (class-sharded classifiers); they leave the softmax.
          class_mask: bool[C], the real rows of a sampled classifier (others
            leave the softmax); None: all rows below ``num_classes``.
          product: the cosine product (see :func:`cosines`); None: float32.
        """
        cos, onehot, cos_y = cosines(embeddings, kernel_normalized, labels, product)
        return self._xent(cos, onehot, cos_y, state, num_classes, class_mask)

    def batch(self, embeddings: jax.Array, kernel_normalized: jax.Array,
              labels: jax.Array, state: Any = None, num_classes: int | None = None,
              class_mask: jax.Array | None = None) -> tuple[jax.Array, Any]:
        """(f32[N] losses, new state) for the step's batch.

        A stateful loss first updates its state from this batch's target
        cosines (no gradient flows into the state) and scores the batch with
        the updated state, as CurricularFace's released code does; the caller
        scores the queue with the same updated state.
        """
        cos, onehot, cos_y = cosines(embeddings, kernel_normalized, labels)
        if self.update_state_fn is not None:
            state = jax.lax.stop_gradient(
                self.update_state_fn(state, jax.lax.stop_gradient(cos_y)))
        return self._xent(cos, onehot, cos_y, state, num_classes, class_mask), state

    def logits(self, cos: jax.Array, onehot: jax.Array, cos_y: jax.Array,
               state: Any = None) -> jax.Array:
        """f32[N, C] scaled logits of the cosines: the registered logits function
        with this loss's fields (the package docstring's contract)."""
        return self.logits_fn(cos, onehot, cos_y, {} if state is None else state, **self.params)

    def _xent(self, cos, onehot, cos_y, state, num_classes, class_mask=None):
        return softmax_cross_entropy(self.logits(cos, onehot, cos_y, state), onehot,
                                     num_classes, class_mask)


@functools.lru_cache(maxsize=None)
def _build(name: str, fields: tuple[tuple[str, float], ...]) -> Loss:
    spec = registry.REGISTRY[name]
    return Loss(name=name, fields=fields,
                logits_fn=registry.spec_function(spec, spec.logits),
                init_state_fn=registry.spec_function(spec, spec.init_state),
                update_state_fn=registry.spec_function(spec, spec.update_state))


def build(loss_config: Any) -> Loss:
    """The loss named by ``config.loss`` (see ``losses.resolve`` for the errors)."""
    name, fields = registry.resolve(loss_config)
    return _build(name, tuple(fields.items()))


@jax.custom_vjp
def scale_gradient(x: jax.Array, factor: jax.Array) -> jax.Array:
    """Identity in the forward pass; multiplies the incoming gradient by `factor`."""
    return x


def _scale_gradient_fwd(x, factor):
    return x, factor


def _scale_gradient_bwd(factor, g):
    return (g * factor.astype(g.dtype), jnp.zeros_like(factor))


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)
