"""Model registry: ``build(name, ...) -> (apply_fn, variables)``.

The bundled families (CIFAR ResNets and VGGs, MobileNet-V1, ResNet-50,
DeiT-Tiny, a small CNN) register themselves on the first :func:`build` or
:func:`registered`.
"""

from __future__ import annotations

from sfpk_jax.models.pretrained import load_pretrained
from sfpk_jax.models.registry import ApplyFn, build, make_apply_fn, register, registered

__all__ = ["ApplyFn", "build", "load_pretrained", "make_apply_fn", "register",
           "registered"]
