"""Optimizers by name: ``config.optimizer.<part>.name`` -> the optax update it builds.

The one list of optimizer names: ``train_step.build_optimizer`` builds each
part's update from :data:`REGISTRY` and ``config_check`` reads the names from
it. Adding an optimizer is one function and one registry line here.

Light (optax is imported inside the builders), so ``config_check`` can import
it without JAX.
"""

from __future__ import annotations

from typing import Any, Callable


def _sgd(learning_rate: Callable[[Any], Any], opt_config: Any) -> Any:
    """PyTorch's SGD with momentum (``buf = mu * buf + g; p -= lr * buf``); 0: plain SGD."""
    import optax  # noqa: PLC0415

    return optax.inject_hyperparams(optax.sgd, static_args=("momentum",))(
        learning_rate=learning_rate, momentum=float(opt_config.momentum) or None)


def _adam(learning_rate: Callable[[Any], Any], opt_config: Any) -> Any:
    """optax's Adam with its default betas (``momentum`` is not used)."""
    import optax  # noqa: PLC0415

    del opt_config
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


#: name -> builder(learning_rate schedule, the part's config) -> the lr-injected update
#: (``optax.inject_hyperparams``, so ``train_step.applied_lr`` finds the lr applied).
REGISTRY: dict[str, Callable[[Callable[[Any], Any], Any], Any]] = {
    "sgd": _sgd,
    "adam": _adam,
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)
