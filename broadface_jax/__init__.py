"""BroadFace (Kim, Park, Shin, ECCV 2020) in JAX / Flax / optax.

Import-time work stays small: submodules are imported where they are used.
"""

__version__ = "0.1.0"
