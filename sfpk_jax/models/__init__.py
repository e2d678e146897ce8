"""Model registry: ``build(name, ...) -> (apply_fn, variables)``.

Importing this package registers the bundled model families.
"""

from __future__ import annotations

from sfpk_jax.models import small_cnn as _small_cnn  # noqa: F401  (registers models)
from sfpk_jax.models.registry import ApplyFn, build, make_apply_fn, register, registered

__all__ = ["ApplyFn", "build", "make_apply_fn", "register", "registered"]
