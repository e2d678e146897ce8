"""Model registry: ``build(name, ...) -> (apply_fn, variables)``.

Importing this package registers the bundled model families.
"""

from __future__ import annotations

# Imported for their side effect: each module registers its models.
from sfpk_jax.models import cifar_resnet as _cifar_resnet  # noqa: F401
from sfpk_jax.models import deit as _deit  # noqa: F401
from sfpk_jax.models import mobilenet as _mobilenet  # noqa: F401
from sfpk_jax.models import resnet50 as _resnet50  # noqa: F401
from sfpk_jax.models import small_cnn as _small_cnn  # noqa: F401
from sfpk_jax.models import vgg as _vgg  # noqa: F401
from sfpk_jax.models.chunked_conv import chunked_conv
from sfpk_jax.models.pretrained import load_pretrained
from sfpk_jax.models.registry import ApplyFn, build, make_apply_fn, register, registered

__all__ = ["ApplyFn", "build", "chunked_conv", "load_pretrained", "make_apply_fn", "register",
           "registered"]
